"""How the emulated API server answers reads: discovery, lists and watches (fixes 4 and 5 in
``emulator.py``'s docstring).

Every write appends its event to one cluster-wide log (``_emit``). A watch takes the objects stored and
its position in that log at the same instant, then follows the log: nothing written while the initial
objects stream is lost, and a watch resuming from a ``resourceVersion`` that has left the bounded
history answers 410 Gone, as a compacted etcd would.
"""
from __future__ import annotations

import asyncio
import bisect
import dataclasses
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import attrs
import kmock

from .admission import status_error

WATCH_CONTENT_TYPE = 'application/json;stream=watch'

_SELECTOR_TERMS = re.compile(r',(?![^()]*\))')  # commas outside "in (a,b)"
_LABEL_TERM = re.compile(
    r'\s*(?P<neg>!?)\s*(?P<key>[^\s!=,()]+)\s*'
    r'(?:(?P<op>==|=|!=)\s*(?P<value>[^\s,()]*)|\s(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*'
)
_FIELD_TERM = re.compile(r'\s*(?P<path>[^\s!=]+)\s*(?P<op>==|=|!=)\s*(?P<value>.*?)\s*')


def _terms(selector: str, pattern: re.Pattern[str], what: str) -> Iterator[re.Match[str]]:
    """The terms of a selector as `pattern` reads them, one at a time: a term that does not parse answers 400
    once it is reached."""
    for term in _SELECTOR_TERMS.split(selector):
        if not term.strip():
            continue
        m = pattern.fullmatch(term)
        if m is None:
            raise status_error(400, 'BadRequest', f'unable to parse {what} selector term {term!r}')
        yield m


def _labels_match(selector: str, labels: Mapping[str, str]) -> bool:
    for m in _terms(selector, _LABEL_TERM, 'label'):
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
    for m in _terms(selector, _FIELD_TERM, 'field'):
        value: Any = obj
        for part in m['path'].split('.'):
            value = value.get(part) if isinstance(value, Mapping) else None
        actual = '' if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        if (actual == m['value']) != (m['op'] != '!='):
            return False
    return True


@dataclasses.dataclass(frozen=True)
class _Event:
    rv: int
    resource: kmock.resource
    type: str
    object: dict[str, Any]


@attrs.define(kw_only=True)
class ListWatchEmulator(kmock.KubernetesEmulator):
    """kmock's ``KubernetesEmulator`` answering reads as an API server does, from one event log.

    ``history_limit`` is how many watch events are kept for watches resuming from a
    ``resourceVersion``; older ones answer 410 Gone, as a compacted etcd would.
    """

    history_limit: int = 10_000

    _rv: int = attrs.field(default=0, init=False)
    _log: list[_Event] = attrs.field(factory=list, init=False)
    _log_floor: int = attrs.field(default=0, init=False)  # events at or below it are forgotten
    _changed: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    @property
    def resource_version(self) -> int:
        """The latest cluster-wide resourceVersion (as an int)."""
        return self._rv

    def close_watches(self) -> None:
        """End all watch streams now (used at shutdown, so the server stops promptly)."""
        self._closed = True
        self._notify()

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo:
        return self.resources[resource] if resource in self.resources else kmock.ResourceInfo()

    def _emit(self, resource: kmock.resource, type_: str, obj: dict[str, Any]) -> None:
        self._log.append(_Event(self._rv, resource, type_, obj))
        if len(self._log) > 2 * self.history_limit:  # trim in batches, amortised O(1)
            self._log_floor = self._log[-self.history_limit - 1].rv
            del self._log[:-self.history_limit]
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

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
            raise status_error(400, 'BadRequest', f'invalid resourceVersion {rv!r}')
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
