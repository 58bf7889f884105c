"""Validating a custom resource against its CRD's schema, for objects kubernetes-validate has no schema for.

kubernetes-validate knows only the built-in kinds (it raises SchemaNotFoundError for a custom resource), so
a CRD's `openAPIV3Schema` is turned into a JSON Schema jsonschema checks, as strictly as the API server's
strict field validation (`kubectl apply --validate=strict`, the default of kubectl since 1.27, refuses unknown
fields):

* an object with `properties` and no `additionalProperties` takes no other field (the API server prunes or,
  strictly, refuses unknown fields of a structural schema);
* `x-kubernetes-int-or-string: true` takes an integer or a string;
* `format: int32` / `int64` bound the integer;
* `nullable: true` also takes null;
* `x-kubernetes-list-type: set` has unique items, `map` unique values of its `x-kubernetes-list-map-keys`
  (checked by `map_key_problems`, which JSON Schema cannot say).

Not checked: CEL rules (`x-kubernetes-validations`), and what the CRD's webhooks refuse or default.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

_SUBSCHEMAS = ("additionalProperties", "items", "allOf", "anyOf", "oneOf", "not")
_INT_BOUNDS = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def to_json_schema(node: Any) -> Any:
    """A structural openAPIV3Schema as the JSON Schema described in the module's docstring."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) if k in _SUBSCHEMAS else v
           for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if "properties" in node:
        out["properties"] = {name: to_json_schema(p) for name, p in node["properties"].items()}
        out.setdefault("additionalProperties", False)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}] + out.get("anyOf", [])
    if node.get("type") == "integer" and node.get("format") in _INT_BOUNDS:
        low, high = _INT_BOUNDS[node["format"]]
        out.setdefault("minimum", low)
        out.setdefault("maximum", high)
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def _crd(path: str) -> dict:
    return yaml.safe_load(Path(path).read_text())


def crd_validator(crd_path: Path, version: str | None = None) -> jsonschema.Validator:
    """A validator for the custom resources of the CRD at `crd_path` (its first version unless named)."""
    crd = _crd(str(crd_path))
    versions = crd["spec"]["versions"]
    entry = next(v for v in versions if version in (None, v["name"]))
    schema = to_json_schema(entry["schema"]["openAPIV3Schema"])
    # The API server checks these itself (apiVersion/kind of the CRD's group, ObjectMeta), not the schema.
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    schema["properties"]["apiVersion"] = {"const": f"{group}/{entry['name']}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted({"apiVersion", "kind", "metadata", *schema.get("required", ())})
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def map_key_problems(crd_path: Path, obj: dict, version: str | None = None) -> list[str]:
    """Lists of `x-kubernetes-list-type: map` in `obj` with two items of the same keys."""
    crd = _crd(str(crd_path))
    entry = next(v for v in crd["spec"]["versions"] if version in (None, v["name"]))
    return list(_map_key_problems(entry["schema"]["openAPIV3Schema"], obj, "$"))


def _map_key_problems(schema: dict, value: Any, where: str) -> Iterator[str]:
    if isinstance(value, dict):
        for name, sub in value.items():
            prop = (schema.get("properties") or {}).get(name) or (
                schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else None)
            if prop is not None:
                yield from _map_key_problems(prop, sub, f"{where}.{name}")
    elif isinstance(value, list):
        items = schema.get("items") or {}
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
            if len(seen) != len(set(seen)):
                yield f"{where}: duplicate {keys} in {seen}"
        for i, item in enumerate(value):
            yield from _map_key_problems(items, item, f"{where}[{i}]")
