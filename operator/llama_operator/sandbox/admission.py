"""What the emulated API server checks and fills in on a write, for the kinds the operator writes.

A real API server refuses some objects outright and writes others back with defaults filled in; the
operator must live with both, so the emulator does the same (k8s.io/apimachinery validation,
pkg/apis/{apps,core}/validation and defaults.go: only what the tests need; the messages are the real
server's):

* ``validate`` refuses with a 422 ``Status``, worded as the real server words it: names (a Service's is a
  DNS-1035 label; a Deployment's, claim's and pod's a DNS-1123 subdomain), label keys and values
  everywhere, a Deployment's selector (matching its template, immutable), tolerations and env Secret keys
  of pod templates, a claim's storage class name;
* ``apply_defaults`` fills in the defaults of Deployments, pod templates and Services
  (``progressDeadlineSeconds``, ``terminationMessagePath``, ``imagePullPolicy``, probe timings, a
  Service's ``clusterIP``...) and writes quantities in their canonical form (``16384Mi`` reads back as
  ``16Gi``).
"""
from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import kmock

from ..units import quantity

NAMESPACES = kmock.resource('', 'v1', 'namespaces')
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


def status_error(status: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    """A refusal answered as a Kubernetes ``Status``, with the message as its cause."""
    details = {'causes': [{'message': message}], **details}  # else kmock sends its own traceback
    return kmock.KubernetesError(status=status, reason=reason, message=message, details=details)


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


_BINARY_SUFFIXES = (('Ei', 2**60), ('Pi', 2**50), ('Ti', 2**40), ('Gi', 2**30), ('Mi', 2**20), ('Ki', 2**10))
_DECIMAL_SUFFIXES = (('E', 10**18), ('P', 10**15), ('T', 10**12), ('G', 10**9), ('M', 10**6), ('k', 10**3))
_CANONICAL_SUFFIXES = {'', 'm', *(s for s, _ in _BINARY_SUFFIXES), *(s for s, _ in _DECIMAL_SUFFIXES)}


def canonical_quantity(value: Any) -> Any:
    """A quantity as the API server writes it back: '16384Mi' -> '16Gi', '2000m' -> '2', '2000' -> '2k'.

    Quantities with an exponent or the suffixes n and u, and anything that is not a quantity, are
    written back as sent."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return value
    text = str(value)
    suffix = text.lstrip('+-0123456789.')
    amount = quantity(text)
    if amount is None or suffix not in _CANONICAL_SUFFIXES:
        return value
    if amount != amount.to_integral_value():
        millis = amount * 1000
        return f'{int(millis)}m' if millis == millis.to_integral_value() else value
    amount = int(amount)
    if amount == 0:
        return '0'
    for name, size in (_BINARY_SUFFIXES if suffix.endswith('i') else _DECIMAL_SUFFIXES):
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

