"""The API emulator behaves like an API server for the real clients: kubernetes, kubectl, kopf.

Each test proves one of the fixes listed in ``llama_operator.sandbox.emulator``'s docstring.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import kopf
import kopf.testing
import kubernetes
import pytest

from llama_operator.sandbox.emulator import ClusterEmulator, declare_custom_resource
from llama_operator.sandbox.server import EmulatorThread, RunningEmulator, serve_emulator

from kit.poll import wait_until

# Real sockets and real timeouts (the server's timeoutSeconds) even if run with --looptime.
pytestmark = pytest.mark.looptime(False)

GROUP, VERSION, PLURAL, KIND = 'llama.example.com', 'v1alpha1', 'llamadeployments', 'LlamaDeployment'


def crd_yaml(plural: str, kind: str, shortname: str) -> str:
    return f"""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {{name: {plural}.{GROUP}}}
spec:
  group: {GROUP}
  scope: Namespaced
  names: {{plural: {plural}, singular: {kind.lower()}, kind: {kind}, shortNames: [{shortname}]}}
  versions:
    - name: {VERSION}
      served: true
      storage: true
      subresources: {{status: {{}}}}
      schema: {{openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}}}
"""


@pytest.fixture(autouse=True)
def _declare_llamas(request):
    """Tests using the threaded emulator get the LlamaDeployment resource declared."""
    if 'emulator_thread' in request.fixturenames:
        declare_custom_resource(request.getfixturevalue('emulator_thread').emulator,
                                GROUP, VERSION, PLURAL, KIND, shortnames=['llama'])


def saw_watch(thread: EmulatorThread, **params: str) -> bool:
    """Whether a watch request with these query parameters has reached the emulator."""
    return any(r.params.get('watch') == 'true' and params.items() <= r.params.items()
               for r in list(thread.emulator))


def custom_api(kube_api: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(kube_api)


def llama(name: str, **extra: Any) -> dict[str, Any]:
    return {'apiVersion': f'{GROUP}/{VERSION}', 'kind': KIND, 'metadata': {'name': name},
            'spec': {'model': 'llama-3.1-8b'}, **extra}


# --- fix 1: server-assigned fields, with the kubernetes client ------------------------------------

def test_create_assigns_server_fields_and_namespace_from_url(kube_api):
    core = kubernetes.client.CoreV1Api(kube_api)
    created = core.create_namespaced_config_map('team-a', {'metadata': {'name': 'c1'}, 'data': {'k': 'v'}})
    meta = created.metadata
    assert meta.namespace == 'team-a'  # from the URL: the body had none
    assert meta.uid and meta.creation_timestamp is not None and meta.generation == 1
    assert int(meta.resource_version) > 0

    fetched = core.read_namespaced_config_map('c1', 'team-a').metadata
    assert (fetched.uid, fetched.resource_version) == (meta.uid, meta.resource_version)

    second = core.create_namespaced_config_map('team-a', {'metadata': {'generateName': 'c-'}})
    assert second.metadata.name.startswith('c-') and second.metadata.uid != meta.uid
    assert int(second.metadata.resource_version) > int(meta.resource_version)  # cluster-wide, monotonic

    # fix 3: the namespace used by the write is now listed (and readable) as a Namespace.
    assert {'default', 'team-a'} <= {ns.metadata.name for ns in core.list_namespace().items}
    assert core.read_namespace('team-a').status.phase == 'Active'

    with pytest.raises(kubernetes.client.ApiException) as err:
        core.create_namespaced_config_map('team-a', {'metadata': {'name': 'c1'}})
    assert err.value.status == 409


def test_generation_bumps_on_spec_changes_only(kube_api):
    api = custom_api(kube_api)
    args = (GROUP, VERSION, 'default', PLURAL)
    obj = api.create_namespaced_custom_object(*args, llama('l1'))
    rvs = [int(obj['metadata']['resourceVersion'])]
    assert obj['metadata']['generation'] == 1

    obj = api.patch_namespaced_custom_object(*args, 'l1', {'spec': {'model': 'llama-3.1-70b'}})
    assert obj['metadata']['generation'] == 2
    rvs.append(int(obj['metadata']['resourceVersion']))

    obj = api.patch_namespaced_custom_object_status(*args, 'l1', {'status': {'phase': 'Ready'}})
    assert obj['metadata']['generation'] == 2 and obj['status'] == {'phase': 'Ready'}
    rvs.append(int(obj['metadata']['resourceVersion']))

    obj = api.patch_namespaced_custom_object(*args, 'l1', {'metadata': {'labels': {'team': 'a'}}})
    assert obj['metadata']['generation'] == 2 and obj['metadata']['labels'] == {'team': 'a'}
    rvs.append(int(obj['metadata']['resourceVersion']))
    assert rvs == sorted(set(rvs))  # every write got a new, larger resourceVersion

    # With a status subresource, the main endpoint ignores status; a no-op writes nothing.
    obj = api.patch_namespaced_custom_object(*args, 'l1', {'status': {'phase': 'Broken'}})
    assert obj['status'] == {'phase': 'Ready'}
    assert int(obj['metadata']['resourceVersion']) == rvs[-1]


# --- fix 2: a failed JSON-patch test answers 422 -------------------------------------------------

def test_stale_json_patch_test_answers_422_and_stale_merge_patch_409(kube_api):
    core = kubernetes.client.CoreV1Api(kube_api)
    stale = core.create_namespaced_config_map('default', {'metadata': {'name': 'c1'}}).metadata.resource_version
    fresh = core.patch_namespaced_config_map('c1', 'default', {'data': {'k': 'v'}}).metadata.resource_version

    with pytest.raises(kubernetes.client.ApiException) as err:
        core.patch_namespaced_config_map('c1', 'default', [
            {'op': 'test', 'path': '/metadata/resourceVersion', 'value': stale},
            {'op': 'replace', 'path': '/data/k', 'value': 'stale write'},
        ])
    assert err.value.status == 422
    assert json.loads(err.value.body)['reason'] == 'Invalid'

    with pytest.raises(kubernetes.client.ApiException) as err:
        core.patch_namespaced_config_map('c1', 'default', {'metadata': {'resourceVersion': stale},
                                                           'data': {'k': 'stale write'}})
    assert err.value.status == 409

    current = core.read_namespaced_config_map('c1', 'default')
    assert current.data == {'k': 'v'} and current.metadata.resource_version == fresh

    patched = core.patch_namespaced_config_map('c1', 'default', [
        {'op': 'test', 'path': '/metadata/resourceVersion', 'value': fresh},
        {'op': 'replace', 'path': '/data/k', 'value': 'fresh write'},
    ])
    assert patched.data == {'k': 'fresh write'}


# --- fixes 3, 4, 5 on the wire, from the test's own loop -----------------------------------------

async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(url, json=body) as resp:
        assert resp.status == 201, await resp.text()
        return await resp.json()


async def _watch(session: aiohttp.ClientSession, url: str, on_first: Callable[[], Any] | None = None,
                 until: int | None = None, **params: str) -> tuple[str, list[dict[str, Any]]]:
    """Read a watch stream till the server ends it (or ``until`` events came); ``on_first`` runs
    after the first event."""
    async with session.get(url, params={'watch': 'true', **params}) as resp:
        assert resp.status == 200, await resp.text()
        events = []
        async for line in resp.content:
            if line.strip():
                events.append(json.loads(line))
                if on_first is not None and len(events) == 1:
                    await on_first()
                if len(events) == until:
                    break
        return resp.headers['Content-Type'], events


async def test_discovery_namespaces_and_lists(emulator_server: RunningEmulator):
    async with aiohttp.ClientSession(emulator_server.url) as session:
        await _post(session, '/api/v1/namespaces/team-b/configmaps', {'metadata': {'name': 'c1'}})
        async with session.get('/api/v1') as resp:
            assert (await resp.json())['groupVersion'] == 'v1'
        async with session.get('/api/v1/namespaces') as resp:
            namespaces = await resp.json()
        assert resp.status == 200 and namespaces['kind'] == 'NamespaceList'
        assert {'default', 'team-b'} <= {ns['metadata']['name'] for ns in namespaces['items']}
        async with session.get('/api/v1/namespaces/team-b/configmaps') as resp:
            listing = await resp.json()
        assert listing['kind'] == 'ConfigMapList' and listing['apiVersion'] == 'v1'
        assert listing['metadata']['resourceVersion'] == str(emulator_server.emulator.resource_version)
        assert [item['metadata']['name'] for item in listing['items']] == ['c1']


async def test_watch_protocol(emulator_server: RunningEmulator):
    url = '/api/v1/namespaces/w/configmaps'
    async with aiohttp.ClientSession(emulator_server.url) as session, asyncio.timeout(15):
        a = await _post(session, url, {'metadata': {'name': 'a', 'labels': {'app': 'x'}}})

        # Watch-list, as kubectl wait does: initial objects, the bookmark, then timeoutSeconds ends it.
        started = time.monotonic()
        content_type, events = await _watch(session, url, sendInitialEvents='true', timeoutSeconds='1',
                                            resourceVersionMatch='NotOlderThan', allowWatchBookmarks='true')
        assert content_type == 'application/json;stream=watch'
        assert 0.9 < time.monotonic() - started < 5
        assert [e['type'] for e in events] == ['ADDED', 'BOOKMARK']
        bookmark = events[1]['object']['metadata']
        assert bookmark['annotations'] == {'k8s.io/initial-events-end': 'true'}
        assert bookmark['resourceVersion'] == a['metadata']['resourceVersion']

        # Resuming from a resourceVersion replays only what happened after it.
        await _post(session, url, {'metadata': {'name': 'b', 'labels': {'app': 'y'}}})
        async with session.patch(f'{url}/a', json={'data': {'k': 'v'}},
                                 headers={'Content-Type': 'application/merge-patch+json'}) as resp:
            assert resp.status == 200
        _, events = await _watch(session, url, resourceVersion=a['metadata']['resourceVersion'], until=2)
        assert [(e['type'], e['object']['metadata']['name']) for e in events] == [('ADDED', 'b'), ('MODIFIED', 'a')]
        _, events = await _watch(session, url, resourceVersion=a['metadata']['resourceVersion'], until=1,
                                 labelSelector='app=x')
        assert [(e['type'], e['object']['metadata']['name']) for e in events] == [('MODIFIED', 'a')]

        # A write made while the initial objects are being streamed is not lost, nor doubled.
        for i in range(20):
            await _post(session, url, {'metadata': {'name': f'bulk-{i}'}})
        _, events = await _watch(session, url, timeoutSeconds='1',
                                 on_first=lambda: _post(session, url, {'metadata': {'name': 'late'}}))
        names = [e['object']['metadata']['name'] for e in events]
        assert len(names) == 23 and names.count('late') == 1 and names[-1] == 'late'


async def test_watch_from_a_forgotten_resource_version_is_gone():
    async with serve_emulator(emulator=ClusterEmulator(history_limit=2)) as running, \
               aiohttp.ClientSession(running.url) as session, asyncio.timeout(10):
        for i in range(6):
            await _post(session, '/api/v1/namespaces/default/configmaps', {'metadata': {'name': f'c{i}'}})
        _, events = await _watch(session, '/api/v1/namespaces/default/configmaps', resourceVersion='1')
        assert [(e['type'], e['object']['code']) for e in events] == [('ERROR', 410)]


# --- kubectl ------------------------------------------------------------------------------------

def test_kubectl_get_apply_and_watch(emulator_thread, kubectl, kube_api):
    assert 'No resources found' in kubectl('get', 'configmaps').stderr
    manifest = 'apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c1}}\ndata: {{k: "{}"}}\n'
    assert 'created' in kubectl('apply', '--validate=false', '-f', '-', input=manifest.format(1)).stdout
    assert 'configured' in kubectl('apply', '--validate=false', '-f', '-', input=manifest.format(2)).stdout
    assert kubectl('get', 'configmap', 'c1', '-o', 'jsonpath={.data.k}').stdout == '2'
    assert 'default' in kubectl('get', 'namespaces', '-o', 'name').stdout

    # `get -w` lists, then watches from the list's resourceVersion; --request-timeout bounds it.
    with subprocess.Popen(kubectl.argv('get', 'configmaps', '-w', '-o', 'name', '--request-timeout=2s'),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            wait_until(lambda: saw_watch(emulator_thread, resourceVersion=str(emulator_thread.emulator.resource_version)),
                       what='the watch request of kubectl get -w')
            kubernetes.client.CoreV1Api(kube_api).create_namespaced_config_map('default', {'metadata': {'name': 'c2'}})
            out, err = proc.communicate(timeout=15)
        finally:
            proc.kill()
    assert out.split() == ['configmap/c1', 'configmap/c2'], err


def test_kubectl_custom_resource_with_status_and_wait(emulator_thread, kubectl, kube_api):
    kubectl('apply', '--validate=false', '-f', '-', input=json.dumps(llama('l1')))
    assert kubectl('get', 'llama', '-o', 'name').stdout.split() == [f'{PLURAL[:-1]}.{GROUP}/l1']

    # kubectl wait uses a watch-list (sendInitialEvents=true) and needs the end-of-initial-events bookmark.
    wait = ('wait', '--for=jsonpath={.status.phase}=Ready', f'{PLURAL}/l1', '--timeout=20s')
    with subprocess.Popen(kubectl.argv(*wait), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            wait_until(lambda: saw_watch(emulator_thread, sendInitialEvents='true'), what='kubectl wait to watch')
            assert proc.poll() is None  # not met yet: still waiting
            custom_api(kube_api).patch_namespaced_custom_object_status(
                GROUP, VERSION, 'default', PLURAL, 'l1', {'status': {'phase': 'Ready'}})
            out, err = proc.communicate(timeout=25)
        finally:
            proc.kill()
    assert proc.returncode == 0 and 'condition met' in out, err

    kubectl('patch', 'llama', 'l1', '--subresource=status', '--type=merge', '-p', '{"status": {"phase": "Gone"}}')
    got = json.loads(kubectl('get', 'llama', 'l1', '-o', 'json').stdout)
    assert got['status'] == {'phase': 'Gone'} and got['metadata']['generation'] == 1
    kubectl('delete', 'llama', 'l1')
    assert kubectl('get', 'llama', '-o', 'name').stdout == ''


def test_kubectl_applied_crd_declares_its_resource(kubectl):
    kubectl('apply', '--validate=false', '-f', '-', input=crd_yaml('llamaclusters', 'LlamaCluster', 'lc'))
    kubectl('wait', '--for=condition=Established', f'crd/llamaclusters.{GROUP}', '--timeout=20s')
    kubectl('apply', '--validate=false', '-f', '-', input=json.dumps(
        {'apiVersion': f'{GROUP}/{VERSION}', 'kind': 'LlamaCluster', 'metadata': {'name': 'lc1'}}))
    assert kubectl('get', 'lc', '-o', 'name').stdout.strip() == f'llamacluster.{GROUP}/lc1'


# --- garbage collection via ownerReferences --------------------------------------------------

def test_deleting_an_owner_deletes_what_it_owns(kube_api):
    core, api = kubernetes.client.CoreV1Api(kube_api), custom_api(kube_api)
    args = (GROUP, VERSION, 'default', PLURAL)
    owner = api.create_namespaced_custom_object(*args, llama('o1', metadata={'name': 'o1', 'finalizers': ['test/hold']}))
    other = api.create_namespaced_custom_object(*args, llama('o2'))

    def owned_by(*owners: dict[str, Any]) -> list[dict[str, Any]]:
        return [{'apiVersion': o['apiVersion'], 'kind': o['kind'], 'name': o['metadata']['name'],
                 'uid': o['metadata']['uid']} for o in owners]

    child = core.create_namespaced_config_map('default', {'metadata': {'name': 'child', 'ownerReferences': owned_by(owner)}})
    child_ref = {'apiVersion': 'v1', 'kind': 'ConfigMap', 'metadata': {'name': 'child', 'uid': child.metadata.uid}}
    core.create_namespaced_secret('default', {'metadata': {'name': 'grandchild', 'ownerReferences': owned_by(child_ref)}})
    core.create_namespaced_config_map('default', {'metadata': {'name': 'shared', 'ownerReferences': owned_by(owner, other)}})

    api.delete_namespaced_custom_object(*args, 'o1')
    assert api.get_namespaced_custom_object(*args, 'o1')['metadata']['deletionTimestamp']
    assert core.read_namespaced_config_map('child', 'default')  # the owner still exists (finalizer)

    api.patch_namespaced_custom_object(*args, 'o1', {'metadata': {'finalizers': None}})
    for read in (lambda: api.get_namespaced_custom_object(*args, 'o1'),
                 lambda: core.read_namespaced_config_map('child', 'default'),
                 lambda: core.read_namespaced_secret('grandchild', 'default')):
        with pytest.raises(kubernetes.client.ApiException) as err:
            read()
        assert err.value.status == 404
    assert core.read_namespaced_config_map('shared', 'default')  # its other owner is alive


def test_an_object_created_for_an_owner_that_is_gone_is_collected(kube_api):
    """As a real API server: the create answers 201 with the object, and the garbage collector removes it."""
    core, api = kubernetes.client.CoreV1Api(kube_api), custom_api(kube_api)
    args = (GROUP, VERSION, 'default', PLURAL)
    owner = api.create_namespaced_custom_object(*args, llama('gone'))
    api.delete_namespaced_custom_object(*args, 'gone')
    ref = {'apiVersion': owner['apiVersion'], 'kind': owner['kind'], 'name': 'gone', 'uid': owner['metadata']['uid']}
    late = core.create_namespaced_config_map('default', {'metadata': {'name': 'late', 'ownerReferences': [ref]}})
    assert late.metadata.name == 'late' and late.metadata.uid
    with pytest.raises(kubernetes.client.ApiException) as err:
        core.read_namespaced_config_map('late', 'default')
    assert err.value.status == 404


def test_deleting_a_namespace_deletes_its_objects(kube_api):
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_namespaced_config_map('doomed', {'metadata': {'name': 'c1'}})
    core.delete_namespace('doomed')
    assert 'doomed' not in {ns.metadata.name for ns in core.list_namespace().items}
    assert core.list_config_map_for_all_namespaces().items == []


# --- kopf -----------------------------------------------------------------------------------

def test_kopf_handles_a_custom_resource_once_with_its_finalizer(emulator_thread, kubeconfig, kube_api, monkeypatch):
    # kubernetes.config read $KUBECONFIG at import time: point both kopf's logins at this one.
    monkeypatch.setenv('KUBECONFIG', str(kubeconfig))
    monkeypatch.setattr(kubernetes.config.kube_config, 'KUBE_CONFIG_DEFAULT_LOCATION', str(kubeconfig))
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_via_client)  # the default login, via the kubeconfig
    created: list[str] = []
    deleted: list[str] = []

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.watching.server_timeout = 10

    @kopf.on.create(GROUP, VERSION, PLURAL, id='on_create', registry=registry)
    def on_create(name: str, body: kopf.Body, **_: Any) -> dict[str, str]:
        created.append(name)
        kopf.info(body, reason='Greeted', message='on_create said hello')
        return {'message': 'hello'}

    @kopf.on.delete(GROUP, VERSION, PLURAL, id='on_delete', registry=registry)
    def on_delete(name: str, **_: Any) -> None:
        deleted.append(name)

    api, args = custom_api(kube_api), (GROUP, VERSION, 'default', PLURAL)
    with kopf.testing.KopfRunner(['run', '--standalone', '-A'], registry=registry, timeout=30) as runner:
        api.create_namespaced_custom_object(*args, llama('l1'))
        obj = wait_until(lambda: (o := api.get_namespaced_custom_object(*args, 'l1')).get('status', {}).get('on_create') and o,
                         timeout=20, what='kopf to write the handler result')
        assert obj['status']['on_create'] == {'message': 'hello'}
        assert obj['metadata']['finalizers'] == ['kopf.zalando.org/KopfFinalizerMarker']
        core = kubernetes.client.CoreV1Api(kube_api)  # kopf's k8s Events use generateName
        wait_until(lambda: any(e.reason == 'Greeted' for e in core.list_namespaced_event('default').items),
                   timeout=10, what='kopf to post an Event')

        api.delete_namespaced_custom_object(*args, 'l1')

        def gone() -> bool:
            try:
                api.get_namespaced_custom_object(*args, 'l1')
            except kubernetes.client.ApiException as e:
                return e.status == 404
            return False

        wait_until(gone, timeout=20, what='kopf to remove its finalizer and the object to go')
    assert runner.exception is None
    assert created == ['l1'] and deleted == ['l1']


# --- added: what a real API server checks and fills in for Deployments, Services and claims ---------------

def _deployment(name: str, labels: dict | None = None, **pod: Any) -> dict[str, Any]:
    labels = labels or {'app': 'web'}
    return {'apiVersion': 'apps/v1', 'kind': 'Deployment', 'metadata': {'name': name, 'labels': labels},
            'spec': {'selector': {'matchLabels': labels},
                     'template': {'metadata': {'labels': labels},
                                  'spec': {'containers': [{'name': 'c', 'image': 'nginx:1.27',
                                                           'ports': [{'containerPort': 80}],
                                                           'resources': {'requests': {'memory': '16384Mi',
                                                                                      'cpu': '2000m'}}}],
                                           **pod}}}}


def _refusal(call: Callable[[], Any]) -> dict[str, Any]:
    with pytest.raises(kubernetes.client.ApiException) as err:
        call()
    assert err.value.status == 422, err.value
    body = json.loads(err.value.body)
    assert body['kind'] == 'Status' and body['status'] == 'Failure' and body['reason'] == 'Invalid'
    assert body['code'] == 422 and body['details']['causes']
    return body


def test_names_and_labels_a_real_server_refuses_answer_422_with_a_status(kube_api):
    core = kubernetes.client.CoreV1Api(kube_api)
    apps = kubernetes.client.AppsV1Api(kube_api)
    service = {'metadata': {'name': '1chat'}, 'spec': {'ports': [{'port': 80}]}}
    body = _refusal(lambda: core.create_namespaced_service('default', service))
    assert body['message'].startswith('Service "1chat" is invalid: metadata.name: Invalid value: "1chat": '
                                      'a DNS-1035 label must consist of')
    assert body['details'] == {'name': '1chat', 'kind': 'Service', 'causes': [
        {'reason': 'FieldValueInvalid', 'field': 'metadata.name', 'message': body['message'].split(': ', 2)[2]}]}
    for name in ('my.chat', 'a' * 64, 'Chat'):  # a dot, too long, upper case: no Service name
        _refusal(lambda: core.create_namespaced_service('default', {**service, 'metadata': {'name': name}}))
    core.create_namespaced_service('default', {**service, 'metadata': {'name': 'a' * 63}})

    # Deployments: DNS-1123 subdomains (a dot is fine), label values at most 63 characters.
    apps.create_namespaced_deployment('default', _deployment('my.chat'))
    body = _refusal(lambda: apps.create_namespaced_deployment('default', _deployment('x', {'app': 'a' * 64})))
    assert body['message'].startswith('Deployment.apps "x" is invalid: [metadata.labels: Invalid value: "aaaa')
    assert 'must be no more than 63 characters' in body['message'] and body['details']['group'] == 'apps'
    _refusal(lambda: apps.create_namespaced_deployment('default', _deployment('Upper')))
    _refusal(lambda: apps.create_namespaced_deployment('default', _deployment('y', {'app': 'bad value!'})))
    assert [d.metadata.name for d in apps.list_namespaced_deployment('default').items] == ['my.chat']


def test_a_deployments_selector_is_immutable_and_must_match_its_template(kube_api):
    apps = kubernetes.client.AppsV1Api(kube_api)
    apps.create_namespaced_deployment('default', _deployment('web'))
    body = _refusal(lambda: apps.patch_namespaced_deployment(
        'web', 'default', {'spec': {'selector': {'matchLabels': {'app': 'web', 'tier': 'x'}},
                                    'template': {'metadata': {'labels': {'app': 'web', 'tier': 'x'}}}}}))
    assert 'spec.selector: Invalid value' in body['message'] and 'field is immutable' in body['message']
    broken = _deployment('other')
    broken['spec']['template']['metadata']['labels'] = {'app': 'else'}
    body = _refusal(lambda: apps.create_namespaced_deployment('default', broken))
    assert '`selector` does not match template `labels`' in body['message']


def test_pod_templates_and_claims_are_checked_as_a_real_server_does(kube_api):
    apps = kubernetes.client.AppsV1Api(kube_api)
    core = kubernetes.client.CoreV1Api(kube_api)
    body = _refusal(lambda: apps.create_namespaced_deployment('default', _deployment(
        'a', tolerations=[{'key': 'bad key', 'operator': 'Exists'}])))
    assert 'spec.template.spec.tolerations[0].key: Invalid value: "bad key"' in body['message']
    env = _deployment('b')
    env['spec']['template']['spec']['containers'][0]['env'] = [
        {'name': 'HF_TOKEN', 'valueFrom': {'secretKeyRef': {'name': 's', 'key': 'hf token'}}}]
    body = _refusal(lambda: apps.create_namespaced_deployment('default', env))
    assert 'secretKeyRef.key: Invalid value: "hf token": a valid config key' in body['message']
    claim = {'metadata': {'name': 'cache'}, 'spec': {'accessModes': ['ReadWriteOnce'], 'storageClassName': 'Fast SSD',
                                                      'resources': {'requests': {'storage': '100Gi'}}}}
    body = _refusal(lambda: core.create_namespaced_persistent_volume_claim('default', claim))
    assert body['message'].startswith('PersistentVolumeClaim "cache" is invalid: spec.storageClassName')


def test_deployments_and_services_get_the_servers_defaults(kube_api):
    apps = kubernetes.client.AppsV1Api(kube_api)
    core = kubernetes.client.CoreV1Api(kube_api)
    raw = kubernetes.client.ApiClient.sanitize_for_serialization
    d = raw(kube_api, apps.create_namespaced_deployment('default', _deployment('web')))
    assert d['spec']['progressDeadlineSeconds'] == 600 and d['spec']['revisionHistoryLimit'] == 10
    assert d['spec']['strategy'] == {'type': 'RollingUpdate',
                                     'rollingUpdate': {'maxSurge': '25%', 'maxUnavailable': '25%'}}
    pod = d['spec']['template']['spec']
    assert pod['restartPolicy'] == 'Always' and pod['dnsPolicy'] == 'ClusterFirst'
    c = pod['containers'][0]
    assert c['terminationMessagePath'] == '/dev/termination-log' and c['imagePullPolicy'] == 'IfNotPresent'
    assert c['ports'][0]['protocol'] == 'TCP'
    assert c['resources']['requests'] == {'memory': '16Gi', 'cpu': '2'}  # quantities in canonical form
    s = raw(kube_api, core.create_namespaced_service(
        'default', {'metadata': {'name': 'web'}, 'spec': {'ports': [{'port': 80}]}}))['spec']
    ip = s['clusterIP']
    assert ip and s['clusterIPs'] == [ip] and s['type'] == 'ClusterIP' and s['ipFamilies'] == ['IPv4']
    assert s['ports'] == [{'port': 80, 'targetPort': 80, 'protocol': 'TCP'}]
    # The allocated address stays when a patch replaces the spec without it.
    s = raw(kube_api, core.patch_namespaced_service('web', 'default', [
        {'op': 'replace', 'path': '/spec', 'value': {'ports': [{'port': 81}]}}]))['spec']
    assert s['clusterIP'] == ip and s['ports'][0]['port'] == 81
