"""The building blocks of the LlamaDeployment API's models: their base, the bounds of every field, and the
rules Kubernetes sets for the names and labels a spec's fields become.

The spec (api.py) and status (status.py) models are made of these; the CRD carries the same patterns
and bounds, so the API server and the operator refuse the same values.
"""
from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from .units import shown


class ApiModel(BaseModel):
    """A model of the API: an unknown field is refused (a misspelt field is a mistake to report, not to
    ignore)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --- Bounds -------------------------------------------------------------------------------------------
# Every string, list and map of a spec is bounded, here and (the same numbers) in the CRD, so neither the
# API server nor the operator holds more than a few kilobytes per LlamaDeployment.

#: metadata.name names the Service (a DNS-1035 label) and is a label value: at most 63 characters.
MAX_NAME_LENGTH = 63
#: A label value, the name part of a label key (Kubernetes' limits).
MAX_LABEL_VALUE_LENGTH = 63
#: A DNS-1123 subdomain: object names (Secret, PersistentVolumeClaim, StorageClass), label key prefixes.
MAX_SUBDOMAIN_LENGTH = 253
#: A label key or toleration key: an optional subdomain prefix and '/', then a name.
MAX_LABEL_KEY_LENGTH = MAX_SUBDOMAIN_LENGTH + 1 + MAX_LABEL_VALUE_LENGTH
MAX_TOLERATIONS = 32
MAX_NODE_SELECTOR_ENTRIES = 32
MAX_GPU_PRODUCTS = 32

# --- Kubernetes names and labels ---------------------------------------------------------------------
# What the API server checks in the objects the operator renders (k8s.io/apimachinery validation): a
# LlamaDeployment that would make one of them invalid is refused up front, naming its field. The patterns
# are the CRD's (Go RE2, anchored; '[.]' rather than a backslash, so they go into CEL strings as they are);
# the checks below give the message.

DNS1035_LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
#: A label key (a qualified name): an optional DNS-1123 subdomain prefix and '/', then a name of at most 63
#: characters. The prefix's 253 characters are checked apart (RE2 cannot count them and check the syntax).
QUALIFIED_NAME_PATTERN = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                          r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
#: A key of a Secret's data (IsConfigMapKey): letters, digits, '-', '_', '.'; not '.', nor starting '..'.
SECRET_KEY_PATTERN = r"^([-_a-zA-Z0-9]|[.][-_a-zA-Z0-9])[-._a-zA-Z0-9]*$"
#: The CEL check of a qualified name's prefix length (label_key_problem checks it in Python).
QUALIFIED_PREFIX_CEL = "!self.contains('/') || self.matches('^[^/]{1,253}/')"

_LABEL_VALUE_HELP = ("at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit "
                     "(e.g. gpu-pool)")
_LABEL_KEY_HELP = ("a label key: an optional DNS subdomain prefix of at most 253 characters and '/', then a name "
                   "of at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit "
                   "(e.g. example.com/pool or pool)")
_SUBDOMAIN_HELP = "at most 253 lowercase letters, digits, '-' or '.', starting and ending with a letter or digit"


def label_value_problem(value: str) -> str | None:
    if len(value) > MAX_LABEL_VALUE_LENGTH or not re.fullmatch(LABEL_VALUE_PATTERN, value):
        return f"{shown(value)} is not a valid label value: {_LABEL_VALUE_HELP}"
    return None


def label_key_problem(key: str) -> str | None:
    prefix, slash, _ = key.rpartition("/")
    if (len(key) > MAX_LABEL_KEY_LENGTH or not re.fullmatch(QUALIFIED_NAME_PATTERN, key)
            or (slash and len(prefix) > MAX_SUBDOMAIN_LENGTH)):
        return f"{shown(key)} is not {_LABEL_KEY_HELP}"
    return None


def checked_by(problem) -> Any:
    """An AfterValidator from a function returning a problem (or None)."""
    def check(value: str) -> str:
        message = problem(value)
        if message:
            raise ValueError(message)
        return value
    return AfterValidator(check)


def _subdomain_problem(what: str, example: str):
    def problem(value: str) -> str | None:
        if value and not re.fullmatch(DNS1123_SUBDOMAIN_PATTERN, value):
            return f"{shown(value)} is not a valid {what}: {_SUBDOMAIN_HELP} (e.g. {example})"
        return None
    return problem


def _secret_key_problem(value: str) -> str | None:
    if not re.fullmatch(SECRET_KEY_PATTERN, value):
        return (f"{shown(value)} is not a valid Secret key: letters, digits, '-', '_' or '.', not '.' and not "
                "starting with '..' (e.g. HF_TOKEN)")
    return None


#: A label value (nodeSelector values, GPU products as GFD labels them).
LabelValue = Annotated[str, StringConstraints(max_length=MAX_LABEL_VALUE_LENGTH), checked_by(label_value_problem),
                       Field(json_schema_extra={"pattern": LABEL_VALUE_PATTERN})]
#: A label key as a map key: no JSON Schema of its own (a structural schema has no propertyNames); the CRD
#: checks the keys of a LabelMap with the CEL rule below.
LabelKey = Annotated[str, checked_by(label_key_problem)]


def _few_entries(value: Any) -> Any:
    # pydantic counts a map's entries after validating each of them; a huge map is refused before that.
    if isinstance(value, dict) and len(value) > MAX_NODE_SELECTOR_ENTRIES:
        raise ValueError(f"{len(value)} entries, more than the {MAX_NODE_SELECTOR_ENTRIES} allowed")
    return value


#: A map of labels (nodeSelector and the like): at most MAX_NODE_SELECTOR_ENTRIES label keys and values.
LabelMap = Annotated[dict[LabelKey, LabelValue], Field(max_length=MAX_NODE_SELECTOR_ENTRIES, json_schema_extra={
    "x-kubernetes-validations": [{
        "rule": f"self.all(k, size(k) <= {MAX_LABEL_KEY_LENGTH} && k.matches('{QUALIFIED_NAME_PATTERN}') && "
                f"(!k.contains('/') || k.matches('^[^/]{{1,{MAX_SUBDOMAIN_LENGTH}}}/')))",
        "message": f"every key must be {_LABEL_KEY_HELP}",
        "reason": "FieldValueInvalid"}]}), BeforeValidator(_few_entries)]


def object_name(what: str, example: str, *, optional: bool = False) -> Any:
    """The name of an object (a Secret or PersistentVolumeClaim in the LlamaDeployment's namespace, a
    StorageClass): a DNS-1123 subdomain. `optional`: empty is accepted too and means unset, as these fields
    took an empty string before names were checked."""
    pattern = f"^({DNS1123_SUBDOMAIN_PATTERN[1:-1]})?$" if optional else DNS1123_SUBDOMAIN_PATTERN
    return Annotated[str, StringConstraints(min_length=None if optional else 1, max_length=MAX_SUBDOMAIN_LENGTH),
                     checked_by(_subdomain_problem(what, example)), Field(json_schema_extra={"pattern": pattern})]


SecretKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SUBDOMAIN_LENGTH),
                      checked_by(_secret_key_problem), Field(json_schema_extra={"pattern": SECRET_KEY_PATTERN})]


def name_problems(name: Any) -> list[str]:
    """metadata.name as the objects the operator renders need it: the Service is named after it (a DNS-1035
    label, at most 63 characters), and it is the value of the llama-operator.dev/llamadeployment label. Such
    a name also makes NAME-model-cache, the claim of source.cache.size, a valid DNS-1123 subdomain."""
    if not isinstance(name, str):
        return [f"metadata.name: {shown(name)} is not a string"]
    if len(name) > MAX_NAME_LENGTH or not re.fullmatch(DNS1035_LABEL_PATTERN, name):
        return [f"metadata.name: {shown(name)} cannot name the Service the operator creates for it: use at most "
                f"{MAX_NAME_LENGTH} lowercase letters, digits and '-', starting with a letter and ending with a "
                "letter or digit (e.g. chat-8b)"]
    return []
