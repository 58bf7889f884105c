"""An in-memory Kubernetes API server for the tests and for ``llama-operator sandbox``.

It is a subclass of kmock's ``KubernetesEmulator`` that behaves enough like a real API server for
kopf, the ``kubernetes`` client and kubectl. **Pinned to kmock==0.8**: it overrides kmock internals
(``RawHandler.__call__``/``_handle``, the ``_serve_*`` fallbacks, ``Request`` fields, the
``_objects``/``_resources`` stores and ``_internal.dicts.patch_dict``); re-check it on any upgrade.

What it fixes in kmock 0.8 (numbered as in the design notes' TOOLCHAIN.md, "what breaks"):

1. Writes stamp ``uid``, ``creationTimestamp``, ``generation`` (bumped only when something other than
   ``metadata``/``status`` changes), a monotonic cluster-wide ``resourceVersion``, and
   ``metadata.namespace`` from the URL; ``generateName`` works. A merge patch carrying a stale
   ``metadata.resourceVersion`` answers 409; a patch that changes nothing writes nothing.
   With a ``status`` subresource, ``/status`` patches touch only ``status`` and main-resource
   patches leave ``status`` alone (creation keeps whatever status it is given, as Nodes allow).
2. A failed JSON-patch ``test`` (or any invalid JSON patch) answers 422, not 500.
3. ``/api/v1/namespaces[/NAME[/status]]`` is served; namespaces used by writes appear in it.
4. Lists carry ``kind: XList``, ``apiVersion`` and the current ``metadata.resourceVersion``;
   ``/api/v1`` says ``groupVersion: v1``. Lists and watches honour ``labelSelector`` and
   ``fieldSelector`` (equality on any dotted field, e.g. ``metadata.name``).
5. Watches are ``application/json;stream=watch``, end after ``timeoutSeconds``, send the
   ``k8s.io/initial-events-end`` BOOKMARK for ``sendInitialEvents=true``, replay only events newer
   than ``resourceVersion`` (410 Gone once it has left the bounded history), and lose nothing
   written while the initial objects stream (all watches read one cluster-wide event log).

Added: what a real API server checks and fills in for the kinds the operator writes (``validate``,
``apply_defaults``): names (a Service's is a DNS-1035 label; a Deployment's, claim's and pod's a
DNS-1123 subdomain), label keys and values everywhere, a Deployment's selector (matching its template,
immutable), tolerations and env Secret keys of pod templates, a claim's storage class name, each
refused with a 422 ``Status`` as the real server words it; the defaults of Deployments, pod templates
and Services (``progressDeadlineSeconds``, ``terminationMessagePath``, ``imagePullPolicy``, probe
timings, a Service's ``clusterIP``...), and quantities in their canonical form (``16384Mi`` reads back
as ``16Gi``). ``admission`` holds checks a test adds, as an admission webhook, policy or quota would
refuse a write.

Added: deleting an object deletes the objects whose ``ownerReferences`` name its uid (synchronous
garbage collection, skipped for ``propagationPolicy: Orphan``; objects with finalizers get a
``deletionTimestamp`` instead), deleting a Namespace deletes its contents, and creating a
CustomResourceDefinition declares its resources (so ``kubectl apply -f crds/`` just works).

Not emulated: protobuf bodies (415; kubectl's imperative ``create <kind> NAME`` sends them, while
``create -f``/``apply -f``/``patch``/``delete`` send JSON), server-side apply (415), PUT/replace, strategic-merge semantics (a strategic merge
patch is applied as a JSON merge patch, so lists are replaced), openapi (use kubectl
``--validate=false``), Table output, and validation and defaulting beyond the above (custom
resources are stored as sent: no OpenAPI schema, no CEL).
As in kmock, a write is stored even when a test's reaction answers it with an injected error.

kmock is an optional extra (``pip install llama-operator[sandbox]``): only the sandbox command and
the tests import this module.
"""
from __future__ import annotations

import asyncio
import bisect
import contextlib
import copy
import dataclasses
import decimal
import json
import pathlib
import re
import socket
import threading
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import kmock
import yaml
from kmock._internal import dicts as kmock_dicts
from kmock._internal import parsing as kmock_parsing
from kmock._internal import rendering as kmock_rendering

from .units import utc_now

__all__ = [
    'ClusterEmulator',
    'EmulatorThread',
    'RunningEmulator',
    'declare_crd',
    'declare_custom_resource',
    'kubeconfig',
    'serve_emulator',
]

WATCH_CONTENT_TYPE = 'application/json;stream=watch'
NAMESPACES = kmock.resource('', 'v1', 'namespaces')
CRDS = kmock.resource('apiextensions.k8s.io', 'v1', 'customresourcedefinitions')
ALL_VERBS = ('create', 'delete', 'get', 'list', 'patch', 'update', 'watch')

# kmock 0.8 parses "/api/v1/namespaces/X/..." as a namespace prefix, so it fails on these URLs.
_NAMESPACE_URL = re.compile(r'/api/v1/namespaces(?:/([^/]+)(?:/(status|finalize))?)?/?')
_SELECTOR_TERMS = re.compile(r',(?![^()]*\))')  # commas outside "in (a,b)"
_LABEL_TERM = re.compile(
    r'\s*(?P<neg>!?)\s*(?P<key>[^\s!=,()]+)\s*'
    r'(?:(?P<op>==|=|!=)\s*(?P<value>[^\s,()]*)|\s(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*'
)
_FIELD_TERM = re.compile(r'\s*(?P<path>[^\s!=]+)\s*(?P<op>==|=|!=)\s*(?P<value>.*?)\s*')


def _error(status: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    details = {'causes': [{'message': message}], **details}  # else kmock sends its own traceback
    return kmock.KubernetesError(status=status, reason=reason, message=message, details=details)


def _content_type(request: kmock.Request) -> str:
    return next((v for k, v in request.headers.items() if k.lower() == 'content-type'), '')


def _without_directives(patch: Any) -> Any:
    """Drop strategic-merge-patch directives (``$patch``, ``$setElementOrder/...``) from a patch."""
    if isinstance(patch, dict):
        return {k: _without_directives(v) for k, v in patch.items() if not k.startswith('$')}
    if isinstance(patch, list):
        return [_without_directives(v) for v in patch]
    return patch


def _spec_part(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What ``metadata.generation`` tracks: everything except metadata, status and type info."""
    return {k: v for k, v in obj.items() if k not in {'metadata', 'status', 'apiVersion', 'kind'}}


def _labels_match(selector: str, labels: Mapping[str, str]) -> bool:
    for term in _SELECTOR_TERMS.split(selector):
        if not term.strip():
            continue
        m = _LABEL_TERM.fullmatch(term)
        if m is None:
            raise _error(400, 'BadRequest', f'unable to parse label selector term {term!r}')
        key, actual = m['key'], labels.get(m['key'])
        choices = {v.strip() for v in (m['values'] or '').split(',')}
        ok = (
            actual == m['value'] if m['op'] in ('=', '==') else
            actual != m['value'] if m['op'] == '!=' else
            actual in choices if m['setop'] == 'in' else
            actual not in choices if m['setop'] == 'notin' else
            (key in labels) != bool(m['neg'])
        )
        if not ok:
            return False
    return True


def _fields_match(selector: str, obj: Mapping[str, Any]) -> bool:
    for term in _SELECTOR_TERMS.split(selector):
        if not term.strip():
            continue
        m = _FIELD_TERM.fullmatch(term)
        if m is None:
            raise _error(400, 'BadRequest', f'unable to parse field selector term {term!r}')
        value: Any = obj
        for part in m['path'].split('.'):
            value = value.get(part) if isinstance(value, Mapping) else None
        actual = '' if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        if (actual == m['value']) != (m['op'] != '!='):
            return False
    return True


# --- what a real API server checks and fills in, for the kinds the operator writes ----------------------
# (k8s.io/apimachinery validation, pkg/apis/{apps,core}/validation and defaults.go: only what the tests
# need; the messages are the real server's.)

DEPLOYMENTS = kmock.resource('apps', 'v1', 'deployments')
SERVICES = kmock.resource('', 'v1', 'services')
CLAIMS = kmock.resource('', 'v1', 'persistentvolumeclaims')
PODS = kmock.resource('', 'v1', 'pods')

_DNS1123_LABEL = r'[a-z0-9]([-a-z0-9]*[a-z0-9])?'
_DNS1123_SUBDOMAIN = re.compile(rf'{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*')
_DNS1035_LABEL = re.compile(r'[a-z]([-a-z0-9]*[a-z0-9])?')
_QUALIFIED_NAME = re.compile(r'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')
_LABEL_VALUE = re.compile(r'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')
_CONFIG_KEY = re.compile(r'[-._a-zA-Z0-9]+')
_SUBDOMAIN_MSG = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                  "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
                  "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")
_DNS1035_MSG = ("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
                "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', "
                "regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')")
_DNS1123_LABEL_MSG = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
                      "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
                      "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')")
_LABEL_VALUE_MSG = ("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
                    "and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or "
                    "'12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')")
_NAME_PART_MSG = ("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with "
                  "an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
                  "validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')")
_CONFIG_KEY_MSG = ("a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  "
                   "or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')")

_FieldError = tuple[str, Any, str]  # field path, value, what is wrong


def _go_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, int, float, bool)) or value is None else repr(value)


def _invalid(kind: str, group: str, name: str, errors: list[_FieldError]) -> kmock.KubernetesError:
    """A 422 as the real API server answers it: a Status with reason Invalid and a cause per field."""
    causes = [{'reason': 'FieldValueInvalid', 'message': f'Invalid value: {_go_value(v)}: {why}', 'field': f}
              for f, v, why in errors]
    lines = [f'{f}: Invalid value: {_go_value(v)}: {why}' for f, v, why in errors]
    qualified = f'{kind}.{group}' if group else kind
    message = f'{qualified} "{name}" is invalid: ' + (lines[0] if len(lines) == 1 else f'[{", ".join(lines)}]')
    details = {'name': name, 'kind': kind, 'causes': causes, **({'group': group} if group else {})}
    return kmock.KubernetesError(status=422, reason='Invalid', message=message, details=details)


def _check_subdomain(path: str, value: Any, errors: list[_FieldError]) -> None:
    text = str(value)
    if len(text) > 253:
        errors.append((path, value, 'must be no more than 253 characters'))
    if not _DNS1123_SUBDOMAIN.fullmatch(text):
        errors.append((path, value, _SUBDOMAIN_MSG))


def _check_qualified_name(path: str, key: Any, errors: list[_FieldError]) -> None:
    text = str(key)
    prefix, _, name = text.rpartition('/')
    if '/' in text:
        if not prefix:
            errors.append((path, key, 'prefix part must be non-empty'))
        else:
            _check_subdomain(path, prefix, errors)
    if not name or len(name) > 63:
        errors.append((path, key, 'name part must be no more than 63 characters' if name else
                       'name part must be non-empty'))
    elif not _QUALIFIED_NAME.fullmatch(name):
        errors.append((path, key, _NAME_PART_MSG))


def _check_labels(path: str, labels: Any, errors: list[_FieldError]) -> None:
    if not isinstance(labels, Mapping):
        return
    for key, value in labels.items():
        _check_qualified_name(path, key, errors)
        text = '' if value is None else str(value)
        if len(text) > 63:
            errors.append((path, value, 'must be no more than 63 characters'))
        if not _LABEL_VALUE.fullmatch(text):
            errors.append((path, value, _LABEL_VALUE_MSG))


def _check_name(resource: kmock.resource, name: str, errors: list[_FieldError]) -> None:
    if resource == SERVICES:  # Service names are DNS-1035 labels (they become DNS names)
        if len(name) > 63:
            errors.append(('metadata.name', name, 'must be no more than 63 characters'))
        if not _DNS1035_LABEL.fullmatch(name):
            errors.append(('metadata.name', name, _DNS1035_MSG))
    elif resource == NAMESPACES:
        if len(name) > 63:
            errors.append(('metadata.name', name, 'must be no more than 63 characters'))
        if not re.fullmatch(_DNS1123_LABEL, name):
            errors.append(('metadata.name', name, _DNS1123_LABEL_MSG))
    elif resource in (DEPLOYMENTS, CLAIMS, PODS):
        _check_subdomain('metadata.name', name, errors)


def _check_pod_spec(path: str, spec: Any, errors: list[_FieldError]) -> None:
    if not isinstance(spec, Mapping):
        return
    for i, t in enumerate(spec.get('tolerations') or []):
        if not isinstance(t, Mapping):
            continue
        if t.get('key'):
            _check_qualified_name(f'{path}.tolerations[{i}].key', t['key'], errors)
        if t.get('operator') == 'Exists' and t.get('value'):
            errors.append((f'{path}.tolerations[{i}].operator', t['value'],
                           "value must be empty when `operator` is 'Exists'"))
        if t.get('operator') not in (None, '', 'Exists', 'Equal'):
            errors.append((f'{path}.tolerations[{i}].operator', t['operator'], 'Unsupported value'))
        if t.get('effect') not in (None, '', 'NoSchedule', 'PreferNoSchedule', 'NoExecute'):
            errors.append((f'{path}.tolerations[{i}].effect', t['effect'], 'Unsupported value'))
    for key in ('containers', 'initContainers'):
        for i, c in enumerate(spec.get(key) or []):
            for j, e in enumerate((c.get('env') if isinstance(c, Mapping) else None) or []):
                ref = ((e.get('valueFrom') or {}).get('secretKeyRef') if isinstance(e, Mapping) else None) or {}
                if 'key' in ref and not _CONFIG_KEY.fullmatch(str(ref['key'])):
                    errors.append((f'{path}.{key}[{i}].env[{j}].valueFrom.secretKeyRef.key', ref['key'],
                                   _CONFIG_KEY_MSG))
    for i, v in enumerate(spec.get('volumes') or []):
        claim = (v.get('persistentVolumeClaim') if isinstance(v, Mapping) else None) or {}
        if 'claimName' in claim:
            _check_subdomain(f'{path}.volumes[{i}].persistentVolumeClaim.claimName', claim['claimName'], errors)


def validate(resource: kmock.resource, obj: Mapping[str, Any], old: Mapping[str, Any] | None, kind: str) -> None:
    """Refuse (422) what a real API server refuses of the kinds the operator writes: names (a Service's is
    a DNS-1035 label, a Deployment's, claim's and pod's a DNS-1123 subdomain), labels everywhere (keys
    qualified names, values at most 63 characters of the label alphabet), a Deployment's selector (must
    match its template's labels, and never changes), tolerations, Secret keys of env vars, a claim's
    storage class name."""
    meta = obj.get('metadata') or {}
    errors: list[_FieldError] = []
    _check_name(resource, str(meta.get('name') or ''), errors)
    _check_labels('metadata.labels', meta.get('labels'), errors)
    spec = obj.get('spec') if isinstance(obj.get('spec'), Mapping) else {}
    if resource == DEPLOYMENTS:
        template = spec.get('template') or {}
        _check_labels('spec.template.metadata.labels', (template.get('metadata') or {}).get('labels'), errors)
        selector = spec.get('selector') or {}
        _check_labels('spec.selector.matchLabels', selector.get('matchLabels'), errors)
        labels = (template.get('metadata') or {}).get('labels') or {}
        if any(labels.get(k) != v for k, v in (selector.get('matchLabels') or {}).items()):
            errors.append(('spec.template.metadata.labels', labels, '`selector` does not match template `labels`'))
        if old is not None and (old.get('spec') or {}).get('selector') != selector:
            errors.append(('spec.selector', selector, 'field is immutable'))
        _check_pod_spec('spec.template.spec', template.get('spec'), errors)
    elif resource == PODS:
        _check_pod_spec('spec', spec, errors)
    elif resource == CLAIMS:
        if spec.get('storageClassName'):
            _check_subdomain('spec.storageClassName', spec['storageClassName'], errors)
    elif resource == SERVICES and old is not None:
        before = (old.get('spec') or {}).get('clusterIP')
        if before and spec.get('clusterIP') not in (None, '', before):
            errors.append(('spec.clusterIPs[0]', spec.get('clusterIP'), 'may not change once set'))
    if errors:
        raise _invalid(kind, resource.group or '', str(meta.get('name') or ''), errors)


_BINARY_SUFFIXES = [('Ei', 2**60), ('Pi', 2**50), ('Ti', 2**40), ('Gi', 2**30), ('Mi', 2**20), ('Ki', 2**10)]
_DECIMAL_SUFFIXES = [('E', 10**18), ('P', 10**15), ('T', 10**12), ('G', 10**9), ('M', 10**6), ('k', 10**3)]
_QUANTITY = re.compile(r'([+-]?(?:\d+\.?\d*|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?')


def canonical_quantity(value: Any) -> Any:
    """A quantity as the API server writes it back: '16384Mi' -> '16Gi', '2000m' -> '2', '2000' -> '2k'."""
    m = _QUANTITY.fullmatch(str(value)) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if m is None:
        return value
    number, suffix = decimal.Decimal(m.group(1)), m.group(2) or ''
    binary = suffix.endswith('i')
    scale = dict(_BINARY_SUFFIXES).get(suffix) or dict(_DECIMAL_SUFFIXES).get(suffix) or \
        (decimal.Decimal('0.001') if suffix == 'm' else 1)
    amount = number * scale
    if amount != amount.to_integral_value():
        millis = amount * 1000
        return f'{int(millis)}m' if millis == millis.to_integral_value() else value
    amount = int(amount)
    if amount == 0:
        return '0'
    for name, size in (_BINARY_SUFFIXES if binary else _DECIMAL_SUFFIXES):
        if amount % size == 0:
            return f'{amount // size}{name}'
    return str(amount)


def _set(d: dict[str, Any], key: str, value: Any) -> None:
    if d.get(key) in (None, ''):
        d[key] = value


def _default_pod_spec(spec: Any) -> None:
    if not isinstance(spec, dict):
        return
    _set(spec, 'dnsPolicy', 'ClusterFirst')
    _set(spec, 'restartPolicy', 'Always')
    _set(spec, 'terminationGracePeriodSeconds', 30)
    _set(spec, 'schedulerName', 'default-scheduler')
    if spec.get('securityContext') is None:
        spec['securityContext'] = {}
    for key in ('containers', 'initContainers'):
        for c in spec.get(key) or []:
            if not isinstance(c, dict):
                continue
            image = str(c.get('image') or '')
            tag = image.rsplit('/', 1)[-1].split(':', 1)[1] if ':' in image.rsplit('/', 1)[-1] else ''
            _set(c, 'imagePullPolicy', 'Always' if '@' not in image and tag in ('', 'latest') else 'IfNotPresent')
            _set(c, 'terminationMessagePath', '/dev/termination-log')
            _set(c, 'terminationMessagePolicy', 'File')
            for p in c.get('ports') or []:
                if isinstance(p, dict):
                    _set(p, 'protocol', 'TCP')
            for probe in ('startupProbe', 'readinessProbe', 'livenessProbe'):
                if isinstance(c.get(probe), dict):
                    for k, v in (('timeoutSeconds', 1), ('periodSeconds', 10), ('successThreshold', 1),
                                 ('failureThreshold', 3)):
                        _set(c[probe], k, v)
                    if isinstance(c[probe].get('httpGet'), dict):
                        _set(c[probe]['httpGet'], 'scheme', 'HTTP')
            for section in ('requests', 'limits'):
                values = (c.get('resources') or {}).get(section)
                if isinstance(values, dict):
                    c['resources'][section] = {k: canonical_quantity(v) for k, v in values.items()}
    for v in spec.get('volumes') or []:
        if isinstance(v, dict):
            for mode in ('secret', 'configMap', 'downwardAPI', 'projected'):
                if isinstance(v.get(mode), dict):
                    _set(v[mode], 'defaultMode', 420)
            if isinstance(v.get('emptyDir'), dict) and 'sizeLimit' in v['emptyDir']:
                v['emptyDir']['sizeLimit'] = canonical_quantity(v['emptyDir']['sizeLimit'])
            if isinstance(v.get('hostPath'), dict):
                v['hostPath'].setdefault('type', '')


def apply_defaults(resource: kmock.resource, obj: dict[str, Any], old: Mapping[str, Any] | None,
                   next_ip: Callable[[], str]) -> None:
    """Fill in, in place, what a real API server defaults or allocates in a Deployment or Service, and write
    quantities in its canonical form, so that what a client reads back differs from what it sent as it
    does on a real cluster."""
    spec = obj.get('spec')
    if not isinstance(spec, dict):
        return
    if resource == DEPLOYMENTS:
        _set(spec, 'replicas', 1)
        _set(spec, 'revisionHistoryLimit', 10)
        _set(spec, 'progressDeadlineSeconds', 600)
        strategy = spec.setdefault('strategy', {})
        if isinstance(strategy, dict):
            _set(strategy, 'type', 'RollingUpdate')
            if strategy['type'] == 'RollingUpdate':
                rolling = strategy.setdefault('rollingUpdate', {})
                _set(rolling, 'maxSurge', '25%')
                _set(rolling, 'maxUnavailable', '25%')
        template = spec.get('template')
        if isinstance(template, dict):
            template.setdefault('metadata', {}).setdefault('creationTimestamp', None)
            _default_pod_spec(template.get('spec'))
    elif resource == SERVICES:
        _set(spec, 'type', 'ClusterIP')
        _set(spec, 'sessionAffinity', 'None')
        _set(spec, 'internalTrafficPolicy', 'Cluster')
        for p in spec.get('ports') or []:
            if isinstance(p, dict):
                _set(p, 'protocol', 'TCP')
                _set(p, 'targetPort', p.get('port'))
        before = (old or {}).get('spec') or {}
        for key in ('clusterIP', 'clusterIPs', 'ipFamilies', 'ipFamilyPolicy'):  # allocated once, kept
            if spec.get(key) in (None, '', []) and before.get(key):
                spec[key] = copy.deepcopy(before[key])
        if spec.get('clusterIP') in (None, ''):
            spec['clusterIP'] = next_ip()
        _set(spec, 'clusterIPs', [spec['clusterIP']])
        _set(spec, 'ipFamilies', ['IPv4'])
        _set(spec, 'ipFamilyPolicy', 'SingleStack')
    elif resource == CLAIMS:
        storage = ((spec.get('resources') or {}).get('requests') or {})
        if 'storage' in storage:
            storage['storage'] = canonical_quantity(storage['storage'])
        _set(spec, 'volumeMode', 'Filesystem')


@dataclasses.dataclass(frozen=True)
class _Event:
    rv: int
    resource: kmock.resource
    type: str
    object: dict[str, Any]


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator):
    """kmock's ``KubernetesEmulator`` made API-server-like enough for kopf, kubectl and clients.

    Built-in resources are declared (``builtins=True``) and the ``default`` Namespace exists.
    ``history_limit`` is how many watch events are kept for watches resuming from a
    ``resourceVersion``; older ones answer 410 Gone, as a compacted etcd would.
    """

    builtins: bool = True
    history_limit: int = 10_000
    #: Admission checks (as validating webhooks, policies, quotas): each is called with the resource, the
    #: object as it would be stored and the stored one (None on create), and returns None to admit or
    #: (HTTP status, message) to refuse; the write then answers that status with a Status body.
    admission: list[Callable[[kmock.resource, dict[str, Any], dict[str, Any] | None], tuple[int, str] | None]] = \
        attrs.field(factory=list)

    _rv: int = attrs.field(default=0, init=False)
    _log: list[_Event] = attrs.field(factory=list, init=False)
    _log_floor: int = attrs.field(default=0, init=False)  # events at or below it are forgotten
    _changed: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _keys_by_uid: dict[str, tuple[kmock.resource, str | None, str]] = attrs.field(factory=dict, init=False)
    _ips: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.builtins:
            with warnings.catch_warnings():  # kmock 0.8 uses the deprecated read_binary()
                warnings.simplefilter('ignore', DeprecationWarning)
                self.resources.load_bundled()
        self._ensure_namespace('default')

    @property
    def resource_version(self) -> int:
        """The latest cluster-wide resourceVersion (as an int)."""
        return self._rv

    def _next_ip(self) -> str:
        """A Service's cluster IP, as the API server allocates one (10.96.0.0/12)."""
        self._ips += 1
        return f'10.96.{self._ips // 250}.{self._ips % 250 + 1}'

    def close_watches(self) -> None:
        """End all watch streams now (used at shutdown, so the server stops promptly)."""
        self._closed = True
        self._notify()

    # --- request parsing and routing -------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        match = _NAMESPACE_URL.fullmatch(raw_request.path)
        if match is None:
            return await super().__call__(raw_request)

        # The same as kmock's RawHandler.__call__, but with our own parsing of the URL.
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            request = await self._parse_namespace_request(raw_request, match)
            self._requests.append(request)
            try:
                return await self._handle(request)
            except kmock_rendering.StreamingError as e:
                raw_response = e.args[0]
                raise e.__cause__ or e
        except Exception as e:
            if not self._errors:
                raise
            self._errors[-1].append(e)
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(e)
            await self._stream_error(e, raw_response)
            await raw_response.write_eof()
            return raw_response

    async def _parse_namespace_request(
            self, raw: aiohttp.web.BaseRequest, match: re.Match[str],
    ) -> kmock.Request:
        body = await raw.read()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        name, subresource = match.groups()
        path = kmock_parsing.ParsedPath(group='', version='v1', plural='namespaces', name=name)
        action = kmock_parsing.guess_k8s(path, kmock.method(raw.method), dict(raw.query))
        return kmock.Request(
            id=len(self._requests), raw_request=raw, url=raw.url, method=raw.method,
            params=dict(raw.query), headers=dict(raw.headers), cookies=dict(raw.cookies),
            body=body, text=body.decode('utf-8', 'replace'), data=data,
            action=action, resource=NAMESPACES, namespace=None, name=name, subresource=subresource,
        )

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # Replaces KubernetesEmulator._handle: do the write, then serve the response as kmock does
        # (user reactions first, then the _serve_* fallbacks, which read the stored result).
        if 'protobuf' in _content_type(request):  # kubectl's typed clients then retry with JSON
            raise _error(415, 'UnsupportedMediaType', 'only JSON bodies are understood')
        if request.resource is not None:
            async with self._lock:
                if request.action == kmock.action.CREATE and request.subresource is None:
                    self._create(request)
                elif request.action == kmock.action.UPDATE and request.name is not None:
                    self._update(request)
                elif request.action == kmock.action.DELETE and request.name is not None:
                    self._delete(request)
        return await super(kmock.KubernetesEmulator, self)._handle(request)

    # --- writes ------------------------------------------------------------------------------

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo:
        return self.resources[resource] if resource in self.resources else kmock.ResourceInfo()

    def _live(self, key: tuple[kmock.resource, str | None, str]) -> dict[str, Any]:
        if key not in self.objects or self.objects[key].deleted:
            raise _error(404, 'NotFound', f'{key[0].plural} "{key[2]}" not found', name=key[2])
        return copy.deepcopy(self.objects[key].raw)

    def _create(self, request: kmock.Request) -> None:
        resource, data = request.resource, request.data
        assert resource is not None
        if not isinstance(data, dict):
            raise _error(400, 'BadRequest', 'the request body must be a JSON object')
        info = self._info(resource)
        meta = data.setdefault('metadata', {})  # in place: kmock's _serve_create looks it up by name
        namespaced = info.namespaced if info.namespaced is not None else request.namespace is not None
        if request.namespace and meta.get('namespace') not in (None, request.namespace):
            raise _error(400, 'BadRequest', 'the namespace of the object does not match the URL')
        namespace = (request.namespace or meta.get('namespace') or 'default') if namespaced else None
        if not meta.get('name') and meta.get('generateName'):
            meta['name'] = meta['generateName'] + uuid.uuid4().hex[:5]
        if not meta.get('name'):
            raise _error(422, 'Invalid', 'metadata.name or metadata.generateName is required')
        if namespace is None:
            meta.pop('namespace', None)
        else:
            meta['namespace'] = namespace
            self._ensure_namespace(namespace)
        key = (resource, namespace, meta['name'])
        api_version, kind = self._type_meta(resource)
        obj = {'apiVersion': api_version, 'kind': kind, **copy.deepcopy(data)}
        apply_defaults(resource, obj, None, self._next_ip)
        validate(resource, obj, None, kind)  # as a real server: a 422 before a 409
        self._admit(resource, obj, None)
        if key in self.objects and not self.objects[key].deleted:
            raise _error(409, 'AlreadyExists', f'{resource.plural} "{meta["name"]}" already exists')

        obj['metadata'].update(uid=str(uuid.uuid4()), creationTimestamp=utc_now(), generation=1)
        for field in ('deletionTimestamp', 'deletionGracePeriodSeconds', 'resourceVersion'):
            obj['metadata'].pop(field, None)
        if resource == CRDS:
            self._declare_crd(obj)
            names = obj['spec']['names']
            obj['status'] = {'acceptedNames': names, 'conditions': [
                {'type': t, 'status': 'True', 'reason': t, 'lastTransitionTime': utc_now()}
                for t in ('NamesAccepted', 'Established')
            ]}
        self._store(key, obj, 'ADDED')
        owners = {ref.get('uid') for ref in obj['metadata'].get('ownerReferences') or []}
        if owners and not any(self._alive(uid) for uid in owners):
            # Created after its owners were deleted: the real garbage collector removes it too.
            self._delete_object(key, cascade=True)

    def _alive(self, uid: str | None) -> bool:
        """Whether a stored object that is not deleted has this uid: by the uid index, or by scanning for a
        uid it does not hold (an object removed, or stored some other way)."""
        key = self._keys_by_uid.get(uid or '')
        if key is None:
            return any(not o.deleted and o.raw.get('metadata', {}).get('uid') == uid for o in self.objects.values())
        obj = self.objects[key] if key in self.objects else None
        return obj is not None and not obj.deleted and obj.raw.get('metadata', {}).get('uid') == uid

    def _update(self, request: kmock.Request) -> None:
        key = (request.resource, request.namespace, request.name)
        assert request.resource is not None and request.name is not None
        if 'apply-patch' in _content_type(request):
            raise _error(415, 'UnsupportedMediaType', 'server-side apply is not emulated')
        old = self._live(key)
        patch = request.data
        if isinstance(patch, dict):
            patch = _without_directives(patch)
            expected_rv = (patch.get('metadata') or {}).get('resourceVersion')
            if expected_rv is not None and expected_rv != old['metadata'].get('resourceVersion'):
                raise _error(409, 'Conflict', f'the object has been modified: {request.name}')
        elif not isinstance(patch, list):
            raise _error(400, 'BadRequest', 'the patch must be a JSON object or a JSON patch list')
        try:
            new = copy.deepcopy(dict(kmock_dicts.patch_dict(copy.deepcopy(old), patch)))
        except jsonpatch.JsonPatchTestFailed as e:
            raise _error(422, 'Invalid', f'the JSON patch test operation failed: {e}')
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, ValueError, TypeError) as e:
            raise _error(422, 'Invalid', f'the patch cannot be applied: {e}')

        if request.subresource == 'status':  # only status changes, whatever else was patched
            new = dict(copy.deepcopy(old), status=new.get('status'))
            if new['status'] is None:
                del new['status']
        elif 'status' in self._info(request.resource).subresources:  # status only via /status
            new.pop('status', None)
            if 'status' in old:
                new['status'] = old['status']
        meta = new.setdefault('metadata', {})
        for field in ('name', 'namespace', 'uid', 'creationTimestamp', 'generation',
                      'deletionTimestamp', 'deletionGracePeriodSeconds', 'resourceVersion'):
            meta.pop(field, None)
            if field in old['metadata']:
                meta[field] = old['metadata'][field]
        if request.subresource is None:
            apply_defaults(request.resource, new, old, self._next_ip)
            validate(request.resource, new, old, self._type_meta(request.resource)[1])
            self._admit(request.resource, new, old)
        if new == old:
            return  # as a real server does: no write, no new resourceVersion, no event
        if _spec_part(new) != _spec_part(old):
            meta['generation'] = int(meta.get('generation', 0)) + 1
        if request.resource == CRDS:
            self._declare_crd(new)
        self._store(key, new, 'MODIFIED')
        if meta.get('deletionTimestamp') and not meta.get('finalizers'):
            self._remove(key, cascade=True)

    def _admit(self, resource: kmock.resource, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        for check in list(self.admission):
            refused = check(resource, obj, old)
            if refused is not None:
                code, message = refused
                reason = {400: 'BadRequest', 403: 'Forbidden', 422: 'Invalid'}.get(code, 'BadRequest')
                raise _error(code, reason, message, name=(obj.get('metadata') or {}).get('name'),
                             kind=self._type_meta(resource)[1])

    def _declare_crd(self, crd: Mapping[str, Any]) -> None:
        try:
            declare_crd(self, crd)
        except (KeyError, TypeError, AttributeError) as e:
            raise _error(422, 'Invalid', f'not a valid CustomResourceDefinition: missing {e}')

    def _delete(self, request: kmock.Request) -> None:
        key = (request.resource, request.namespace, request.name)
        self._live(key)  # 404 if absent
        options = request.data if isinstance(request.data, dict) else {}
        policy = options.get('propagationPolicy') or request.params.get('propagationPolicy')
        self._delete_object(key, cascade=policy != 'Orphan')

    def _delete_object(self, key: tuple[kmock.resource, str | None, str], cascade: bool) -> None:
        obj = self._live(key)
        meta = obj['metadata']
        if meta.get('deletionTimestamp'):
            return  # already being deleted, waiting for its finalizers
        if meta.get('finalizers'):
            meta.update(deletionTimestamp=utc_now(), deletionGracePeriodSeconds=0)
            self._store(key, obj, 'MODIFIED')
        else:
            self._remove(key, cascade=cascade)

    def _remove(self, key: tuple[kmock.resource, str | None, str], cascade: bool) -> None:
        """Really delete the object, then whatever it owned (a tiny garbage collector)."""
        last = self._live(key)
        self._rv += 1
        last['metadata']['resourceVersion'] = str(self._rv)
        self.objects[key].delete()  # kmock's soft deletion: the history stays for assertions
        self._keys_by_uid.pop(last['metadata'].get('uid') or '', None)
        self._emit(key[0], 'DELETED', last)
        if not cascade:
            return
        uid = last['metadata'].get('uid')
        live = [(k, o.raw) for k, o in self.objects.items() if not o.deleted]
        alive_uids = {raw.get('metadata', {}).get('uid') for _, raw in live}
        for dependent_key, raw in live:
            owner_uids = {ref.get('uid') for ref in raw.get('metadata', {}).get('ownerReferences') or []}
            in_namespace = key[0] == NAMESPACES and dependent_key[1] == key[2]
            orphaned = uid is not None and uid in owner_uids and not (owner_uids & alive_uids)
            if (in_namespace or orphaned) and not self.objects[dependent_key].deleted:
                self._delete_object(dependent_key, cascade=True)

    def _store(self, key: tuple[kmock.resource, str | None, str], obj: dict[str, Any], event: str) -> None:
        self._rv += 1
        obj['metadata']['resourceVersion'] = str(self._rv)
        if key in self.objects:
            self.objects[key].history.append(obj)
        else:
            self.objects[key] = obj
        if obj['metadata'].get('uid'):
            self._keys_by_uid[obj['metadata']['uid']] = key
        self._emit(key[0], event, obj)

    def _ensure_namespace(self, name: str) -> None:
        key = (NAMESPACES, None, name)
        if key not in self.objects or self.objects[key].deleted:
            self._store(key, {
                'apiVersion': 'v1', 'kind': 'Namespace',
                'metadata': {'name': name, 'uid': str(uuid.uuid4()),
                             'creationTimestamp': utc_now(), 'generation': 1},
                'spec': {'finalizers': ['kubernetes']}, 'status': {'phase': 'Active'},
            }, 'ADDED')

    def _emit(self, resource: kmock.resource, type_: str, obj: dict[str, Any]) -> None:
        self._log.append(_Event(self._rv, resource, type_, obj))
        if len(self._log) > 2 * self.history_limit:  # trim in batches, amortised O(1)
            self._log_floor = self._log[-self.history_limit - 1].rv
            del self._log[:-self.history_limit]
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # --- reads ---------------------------------------------------------------------------------

    def _selects(self, request: kmock.Request, resource: kmock.resource, obj: Mapping[str, Any]) -> bool:
        meta = obj.get('metadata', {})
        return (
            resource == request.resource
            and (request.namespace is None or meta.get('namespace') == request.namespace)
            and (request.name is None or meta.get('name') == request.name)
            and _fields_match(request.params.get('fieldSelector', ''), obj)
            and _labels_match(request.params.get('labelSelector', ''), meta.get('labels') or {})
        )

    def _snapshot(self, request: kmock.Request) -> list[dict[str, Any]]:
        return [
            obj.raw for (resource, _, _), obj in self.objects.items()
            if not obj.deleted and self._selects(request, resource, obj.raw)
        ]

    def _type_meta(self, resource: kmock.resource) -> tuple[str, str]:
        kind = self._info(resource).kind or (resource.plural or '').capitalize()
        return f'{resource.group}/{resource.version}'.lstrip('/'), kind

    async def _serve_version(self, request: kmock.Request) -> Any:
        result = await super()._serve_version(request)
        result['groupVersion'] = result['groupVersion'].lstrip('/')  # "/v1" -> "v1"
        for entry in result['resources']:
            if '/' in entry['name']:  # subresources: no short names (kubectl warns of ambiguity)
                entry.update(shortNames=[], categories=[], verbs=['get', 'patch', 'update'])
        return result

    async def _serve_create(self, request: kmock.Request) -> Any:
        # 201 Created, as a real server answers (kubernetes>=35's CustomObjectsApi expects it), with the
        # object as created even when the garbage collector removed it at once (its owner was gone).
        stored = self._stored(request)
        payload = stored.last.raw if stored is not None else await super()._serve_create(request)
        return kmock.Response(status=201, payload=payload)

    async def _serve_update(self, request: kmock.Request) -> Any:
        stored = self._stored(request)
        return stored.last.raw if stored is not None else await super()._serve_update(request)

    async def _serve_delete(self, request: kmock.Request) -> Any:
        stored = self._stored(request)
        return stored.last.raw if stored is not None else await super()._serve_delete(request)

    def _stored(self, request: kmock.Request) -> Any:
        """The object a write has just stored, found by its key (kmock's own lookup scans every object on
        every write); None when the key does not name one, and kmock's lookup decides."""
        meta = (request.data.get('metadata') or {}) if isinstance(request.data, dict) else {}
        key = (request.resource, request.namespace or meta.get('namespace'), request.name or meta.get('name'))
        return self.objects[key] if key in self.objects else None

    async def _serve_list(self, request: kmock.Request) -> Any:
        assert request.resource is not None
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        api_version, kind = self._type_meta(request.resource)
        return {
            'apiVersion': api_version, 'kind': f'{kind}List',
            'metadata': {'resourceVersion': str(self._rv)},
            'items': self._snapshot(request),
        }

    async def _serve_watch(self, request: kmock.Request) -> Any:
        # Everything up to the response is synchronous: the initial snapshot and the position in
        # the event log are taken at the same instant, so no write can fall between them.
        params = request.params
        _fields_match(params.get('fieldSelector', ''), {})  # 400 now, not mid-stream
        _labels_match(params.get('labelSelector', ''), {})
        initial = params.get('sendInitialEvents') == 'true'
        rv = params.get('resourceVersion') or '0'
        if not rv.isdigit():
            raise _error(400, 'BadRequest', f'invalid resourceVersion {rv!r}')
        since = self._rv if initial or rv == '0' else int(rv)
        snapshot = self._snapshot(request) if initial or rv == '0' else []
        timeout = float(params['timeoutSeconds']) if params.get('timeoutSeconds') else None
        stream = self._stream_watch(request, snapshot, since, bookmark=initial, timeout=timeout)
        return kmock.Response(headers={'Content-Type': WATCH_CONTENT_TYPE}, payload=stream)

    async def _stream_watch(
            self, request: kmock.Request, snapshot: list[dict[str, Any]], since: int,
            *, bookmark: bool, timeout: float | None,
    ) -> AsyncIterator[Any]:
        assert request.resource is not None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        yield b''  # send the headers now, even if nothing happens for a while
        for obj in snapshot:
            yield {'type': 'ADDED', 'object': obj}
        if bookmark:
            api_version, kind = self._type_meta(request.resource)
            yield {'type': 'BOOKMARK', 'object': {'apiVersion': api_version, 'kind': kind, 'metadata': {
                'resourceVersion': str(since),
                'annotations': {'k8s.io/initial-events-end': 'true'},
            }}}
        while not self._closed:
            changed = self._changed  # taken before reading the log: a later write sets it
            if since < self._log_floor:
                yield {'type': 'ERROR', 'object': {
                    'apiVersion': 'v1', 'kind': 'Status', 'metadata': {}, 'status': 'Failure',
                    'code': 410, 'reason': 'Expired', 'message': f'too old resource version: {since}',
                }}
                return
            for event in self._log[bisect.bisect_right(self._log, since, key=lambda e: e.rv):]:
                since = event.rv
                if self._selects(request, event.resource, event.object):
                    yield {'type': event.type, 'object': event.object}
            remaining = None if deadline is None else deadline - loop.time()
            if self._closed or (remaining is not None and remaining <= 0):
                return
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return


def declare_custom_resource(
        emulator: kmock.KubernetesScaffold,
        group: str,
        version: str,
        plural: str,
        kind: str,
        *,
        namespaced: bool = True,
        singular: str | None = None,
        shortnames: Iterable[str] = (),
        categories: Iterable[str] = (),
        subresources: Iterable[str] = ('status',),
) -> kmock.resource:
    """Declare a custom resource for discovery (kubectl, kopf); returns its ``kmock.resource``."""
    resource = kmock.resource(group, version, plural)
    emulator.resources[resource] = kmock.ResourceInfo(
        kind=kind, namespaced=namespaced, singular=singular or kind.lower(), verbs=ALL_VERBS,
        shortnames=shortnames, categories=categories, subresources=subresources,
    )
    return resource


def declare_crd(emulator: kmock.KubernetesScaffold, crd: Mapping[str, Any]) -> list[kmock.resource]:
    """Declare the served versions of a CustomResourceDefinition manifest (a dict)."""
    spec, names = crd['spec'], crd['spec']['names']
    return [
        declare_custom_resource(
            emulator, spec['group'], version['name'], names['plural'], names['kind'],
            namespaced=spec.get('scope', 'Namespaced') == 'Namespaced',
            singular=names.get('singular'), shortnames=names.get('shortNames', ()),
            categories=names.get('categories', ()), subresources=version.get('subresources') or {},
        )
        for version in spec['versions'] if version.get('served', True)
    ]


def kubeconfig(url: str, namespace: str = 'default', name: str = 'llama-emulator') -> dict[str, Any]:
    """A kubeconfig for a plain-http server without authentication."""
    return {
        'apiVersion': 'v1', 'kind': 'Config', 'preferences': {},
        'clusters': [{'name': name, 'cluster': {'server': url}}],
        'users': [{'name': name, 'user': {}}],
        'contexts': [{'name': name, 'context': {'cluster': name, 'user': name, 'namespace': namespace}}],
        'current-context': name,
    }


@dataclasses.dataclass(frozen=True)
class RunningEmulator:
    """An emulator served on a real TCP port."""
    emulator: ClusterEmulator
    host: str
    port: int

    @property
    def url(self) -> str:
        return f'http://{self.host}:{self.port}'

    def write_kubeconfig(self, path: str | pathlib.Path, namespace: str = 'default') -> pathlib.Path:
        path = pathlib.Path(path)
        path.write_text(yaml.safe_dump(kubeconfig(self.url, namespace), sort_keys=False))
        return path


@contextlib.asynccontextmanager
async def serve_emulator(
        host: str = '127.0.0.1', port: int = 0, *, emulator: ClusterEmulator | None = None,
) -> AsyncIterator[RunningEmulator]:
    """Serve an emulator (a new ``ClusterEmulator`` unless given) on ``host:port`` (0: any free)."""
    emulator = ClusterEmulator() if emulator is None else emulator
    emulator._closed = False  # in case it was served and closed before
    runner = aiohttp.web.ServerRunner(aiohttp.web.Server(emulator, access_log=None), shutdown_timeout=1.0)
    with socket.create_server((host, port)) as sock:
        async with emulator:
            await runner.setup()
            try:
                await aiohttp.web.SockSite(runner, sock).start()
                yield RunningEmulator(emulator, host, sock.getsockname()[1])
            finally:
                emulator.close_watches()  # else open watches hold the shutdown for its timeout
                await runner.cleanup()


_T = TypeVar('_T')


class EmulatorThread:
    """An emulator served from a background thread with its own event loop, for sync code.

    Use as a context manager, or ``start()`` / ``stop()``. ``call()`` runs a coroutine function
    in the emulator's loop (e.g. to inspect or seed ``emulator.objects`` without races).
    """

    def __init__(
            self, host: str = '127.0.0.1', port: int = 0,
            emulator_factory: Callable[[], ClusterEmulator] = ClusterEmulator,
    ) -> None:
        self._host, self._port, self._factory = host, port, emulator_factory
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._running: RunningEmulator | None = None
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> EmulatorThread:
        if self._thread is not None:
            raise RuntimeError('The emulator thread can be started only once.')
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),),
                                        name='llama-emulator', daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f'The emulator did not start in {timeout}s.')
        if self._error is not None:
            raise RuntimeError('The emulator failed to start.') from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop has just finished
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f'The emulator did not stop in {timeout}s.')

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            async with serve_emulator(self._host, self._port, emulator=self._factory()) as running:
                self._running = running
                self._ready.set()
                await self._stop.wait()
        except BaseException as e:
            self._error = e
            raise
        finally:
            self._ready.set()

    def call(self, fn: Callable[[], Coroutine[Any, Any, _T]], timeout: float = 10.0) -> _T:
        assert self._loop is not None, 'The emulator thread is not started.'
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(timeout)

    @property
    def running(self) -> RunningEmulator:
        if self._running is None:
            raise RuntimeError('The emulator thread is not started.')
        return self._running

    @property
    def emulator(self) -> ClusterEmulator:
        return self.running.emulator

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def port(self) -> int:
        return self.running.port

    def write_kubeconfig(self, path: str | pathlib.Path, namespace: str = 'default') -> pathlib.Path:
        return self.running.write_kubeconfig(path, namespace)

    def __enter__(self) -> EmulatorThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
