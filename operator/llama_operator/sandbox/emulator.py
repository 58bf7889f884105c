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

Reads (4 and 5) are answered by the base class in ``reads.py``, writes here; ``server.py`` serves the
emulator on a port.

Added: what a real API server checks and fills in for the kinds the operator writes (``admission.py``:
names, labels, a Deployment's selector and more refused with a 422 ``Status`` as the real server words
it; defaults filled in; quantities in their canonical form). ``ClusterEmulator.admission`` holds checks a
test adds, as an admission webhook, policy or quota would refuse a write.

Added: deleting an object deletes the objects whose ``ownerReferences`` name its uid (synchronous
garbage collection, skipped for ``propagationPolicy: Orphan``; objects with finalizers get a
``deletionTimestamp`` instead), deleting a Namespace deletes its contents, and creating a
CustomResourceDefinition declares its resources (so ``kubectl apply -f crds/`` just works).

Not emulated: protobuf bodies (415; kubectl's imperative ``create <kind> NAME`` sends them, while
``create -f``/``apply -f``/``patch``/``delete`` send JSON), server-side apply (415), PUT/replace,
strategic-merge semantics (a strategic merge patch is applied as a JSON merge patch, so lists are
replaced), openapi (use kubectl ``--validate=false``), Table output, and validation and defaulting
beyond the above (custom resources are stored as sent: no OpenAPI schema, no CEL).
As in kmock, a write is stored even when a test's reaction answers it with an injected error.

kmock is an optional extra (``pip install llama-operator[sandbox]``): only the sandbox command and
the tests import this package.
"""
from __future__ import annotations

import copy
import json
import re
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import dicts as kmock_dicts
from kmock._internal import parsing as kmock_parsing
from kmock._internal import rendering as kmock_rendering

from ..units import utc_now
from .admission import NAMESPACES, apply_defaults, status_error, validate
from .reads import ListWatchEmulator

CRDS = kmock.resource('apiextensions.k8s.io', 'v1', 'customresourcedefinitions')
ALL_VERBS = ('create', 'delete', 'get', 'list', 'patch', 'update', 'watch')

# kmock 0.8 parses "/api/v1/namespaces/X/..." as a namespace prefix, so it fails on these URLs.
_NAMESPACE_URL = re.compile(r'/api/v1/namespaces(?:/([^/]+)(?:/(status|finalize))?)?/?')


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


@attrs.define(kw_only=True)
class ClusterEmulator(ListWatchEmulator):
    """kmock's ``KubernetesEmulator`` made API-server-like enough for kopf, kubectl and clients.

    Built-in resources are declared and the ``default`` Namespace exists.
    """

    #: Admission checks (as validating webhooks, policies, quotas): each is called with the resource, the
    #: object as it would be stored and the stored one (None on create), and returns None to admit or
    #: (HTTP status, message) to refuse; the write then answers that status with a Status body.
    admission: list[Callable[[kmock.resource, dict[str, Any], dict[str, Any] | None], tuple[int, str] | None]] = \
        attrs.field(factory=list)

    _keys_by_uid: dict[str, tuple[kmock.resource, str | None, str]] = attrs.field(factory=dict, init=False)
    _ips: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        with warnings.catch_warnings():  # kmock 0.8 uses the deprecated read_binary()
            warnings.simplefilter('ignore', DeprecationWarning)
            self.resources.load_bundled()
        self._ensure_namespace('default')

    def _next_ip(self) -> str:
        """A Service's cluster IP, as the API server allocates one (10.96.0.0/12)."""
        self._ips += 1
        return f'10.96.{self._ips // 250}.{self._ips % 250 + 1}'

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
            raise status_error(415, 'UnsupportedMediaType', 'only JSON bodies are understood')
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

    def _live(self, key: tuple[kmock.resource, str | None, str]) -> dict[str, Any]:
        if key not in self.objects or self.objects[key].deleted:
            raise status_error(404, 'NotFound', f'{key[0].plural} "{key[2]}" not found', name=key[2])
        return copy.deepcopy(self.objects[key].raw)

    def _create(self, request: kmock.Request) -> None:
        resource, data = request.resource, request.data
        assert resource is not None
        if not isinstance(data, dict):
            raise status_error(400, 'BadRequest', 'the request body must be a JSON object')
        info = self._info(resource)
        meta = data.setdefault('metadata', {})  # in place: kmock's _serve_create looks it up by name
        namespaced = info.namespaced if info.namespaced is not None else request.namespace is not None
        if request.namespace and meta.get('namespace') not in (None, request.namespace):
            raise status_error(400, 'BadRequest', 'the namespace of the object does not match the URL')
        namespace = (request.namespace or meta.get('namespace') or 'default') if namespaced else None
        if not meta.get('name') and meta.get('generateName'):
            meta['name'] = meta['generateName'] + uuid.uuid4().hex[:5]
        if not meta.get('name'):
            raise status_error(422, 'Invalid', 'metadata.name or metadata.generateName is required')
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
            raise status_error(409, 'AlreadyExists', f'{resource.plural} "{meta["name"]}" already exists')

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
            raise status_error(415, 'UnsupportedMediaType', 'server-side apply is not emulated')
        old = self._live(key)
        patch = request.data
        if isinstance(patch, dict):
            patch = _without_directives(patch)
            expected_rv = (patch.get('metadata') or {}).get('resourceVersion')
            if expected_rv is not None and expected_rv != old['metadata'].get('resourceVersion'):
                raise status_error(409, 'Conflict', f'the object has been modified: {request.name}')
        elif not isinstance(patch, list):
            raise status_error(400, 'BadRequest', 'the patch must be a JSON object or a JSON patch list')
        try:
            new = copy.deepcopy(dict(kmock_dicts.patch_dict(copy.deepcopy(old), patch)))
        except jsonpatch.JsonPatchTestFailed as e:
            raise status_error(422, 'Invalid', f'the JSON patch test operation failed: {e}')
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, ValueError, TypeError) as e:
            raise status_error(422, 'Invalid', f'the patch cannot be applied: {e}')

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
                raise status_error(code, reason, message, name=(obj.get('metadata') or {}).get('name'),
                             kind=self._type_meta(resource)[1])

    def _declare_crd(self, crd: Mapping[str, Any]) -> None:
        try:
            declare_crd(self, crd)
        except (KeyError, TypeError, AttributeError) as e:
            raise status_error(422, 'Invalid', f'not a valid CustomResourceDefinition: missing {e}')

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

    # --- answers to writes ------------------------------------------------------------------

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
