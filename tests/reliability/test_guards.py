"""Objects the operator does not own, hand edits of the objects it does own, and what the API server refuses.

* An object named like one the operator renders (a Service, a Deployment, the model-cache claim) that the
  LlamaDeployment does not control is never changed, not even after the LlamaDeployment is deleted; the
  LlamaDeployment says so (Degraded, Ready False OwnershipConflict, the object and the fix named) with one
  Warning Event, and converges once the object is removed. A claim named in existingClaim is used as asked.
* A hand edit of an owned Deployment or Service (image, privileged, a hostPath volume, replicas, selector)
  is written back at once, with one Warning DriftCorrected Event; an unchanged object costs no write
  through resyncs, although the emulator defaults fields and canonicalises quantities as a real server.
* A write the API server refuses (an admission policy, a quota) makes the LlamaDeployment Invalid with
  the server's message and one Warning Event, one log line and no traceback, and is not sent again on
  every wake; a name no Service can have is Invalid before anything is written; pods refused by Pod
  Security admission (the Deployment's ReplicaFailure) make it Degraded with the admission error.

One operator (resync 1.5 s) serves the module; each case runs in a namespace of its own and deletes what
it made, so the quiet checks see only their own case.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

import pytest
from kubernetes.dynamic.exceptions import NotFoundError

from llama_operator.api import KIND
from llama_operator.ownership import LABEL_DEPLOYMENT, MANAGED_BY
from llama_operator.sandbox.admission import CLAIMS, DEPLOYMENTS
from llama_operator.sandbox.kubelet import SimulatedKubelet

from kit.operator import fast_settings
from kit.poll import wait_until
from reliability_cases import GUARD_CASES
from reliability_harness import FaultyCluster, chat_doc, writes_by_port

RESYNC = 1.5
CASES = {c.key: c for c in GUARD_CASES}
PSA_NAMESPACE = "psa"


# --- a kubelet with Pod Security admission --------------------------------------------------------------


def restricted_violations(pod_spec: dict) -> list[str]:
    """What Pod Security admission finds wrong with a pod under the "restricted" standard, worded as it
    words it (k8s.io/pod-security-admission policy checks; those a model server's pod can fail)."""
    out = []
    pod_sc = pod_spec.get("securityContext") or {}
    containers = [c for key in ("initContainers", "containers") for c in pod_spec.get(key) or []]
    names = ", ".join(f'"{c.get("name")}"' for c in containers)
    if any((c.get("securityContext") or {}).get("privileged") for c in containers):
        out.append("privileged (containers must not set securityContext.privileged=true)")
    escalating = [c["name"] for c in containers if (c.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False]
    if escalating:
        out.append(f"allowPrivilegeEscalation != false (containers {escalating} must set "
                   f"securityContext.allowPrivilegeEscalation=false)")
    capable = [c["name"] for c in containers
               if "ALL" not in (((c.get("securityContext") or {}).get("capabilities") or {}).get("drop") or [])]
    if capable:
        out.append(f'unrestricted capabilities (containers {capable} must set securityContext.capabilities.drop=["ALL"])')
    host_paths = [v["name"] for v in pod_spec.get("volumes") or [] if "hostPath" in v]
    if host_paths:
        out.append(f"restricted volume types (volumes {host_paths} use restricted volume type \"hostPath\")")
    if not pod_sc.get("runAsNonRoot") and not all((c.get("securityContext") or {}).get("runAsNonRoot")
                                                  for c in containers):
        out.append(f"runAsNonRoot != true (pod or containers {names} must set securityContext.runAsNonRoot=true)")
    if pod_sc.get("runAsUser") == 0 or any((c.get("securityContext") or {}).get("runAsUser") == 0 for c in containers):
        out.append("runAsUser=0 (pod and containers must not set runAsUser=0)")
    if (pod_sc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost") and not all(
            ((c.get("securityContext") or {}).get("seccompProfile") or {}).get("type") in ("RuntimeDefault", "Localhost")
            for c in containers):
        out.append(f'seccompProfile (pod or containers {names} must set securityContext.seccompProfile.type to '
                   f'"RuntimeDefault" or "Localhost")')
    return out


def _revision(template: dict) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]  # as SimulatedKubelet


class AdmissionKubelet(SimulatedKubelet):
    """The sandbox's simulated kubelet, plus two things of a real cluster: in `restricted` namespaces (Pod
    Security "restricted" enforced), a Deployment whose pods do not comply gets none, and reports the
    refusal in ReplicaFailure as its controller does; and pods beyond a Deployment's replicas go (a
    scale-down)."""

    def __init__(self, kubeconfig: str, restricted: set[str], interval: float = 0.2):
        super().__init__(kubeconfig, interval)
        self.restricted = restricted

    def _sync(self, d, pods, nodes, used, pod_res, dep_res) -> None:
        ns, name = d["metadata"]["namespace"], d["metadata"]["name"]
        template = d["spec"]["template"]
        revision = _revision(template)
        violations = restricted_violations(template["spec"]) if ns in self.restricted else []
        if violations:
            status = {
                "observedGeneration": d["metadata"].get("generation", 1),
                "replicas": 0, "updatedReplicas": 0, "readyReplicas": 0, "availableReplicas": 0,
                "conditions": [
                    {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable",
                     "message": "Deployment does not have minimum availability."},
                    {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                     "message": f'pods "{name}-{revision}-" is forbidden: violates PodSecurity "restricted:latest": '
                                + ", ".join(violations)},
                ],
            }
            if d.get("status") != status:
                dep_res.status.patch(body={"status": status}, name=name, namespace=ns,
                                     content_type="application/merge-patch+json")
            return
        want = int(d["spec"].get("replicas", 1))
        current = [p for p in pods if p["metadata"]["labels"].get("pod-template-hash") == revision]
        for p in current[want:]:
            pod_res.delete(name=p["metadata"]["name"], namespace=ns)
        super()._sync(d, [p for p in pods if p not in current[want:]], nodes, used, pod_res, dep_res)


# --- the module's cluster and operator ------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cluster = FaultyCluster(tmp_path_factory.mktemp("guards"), kubelet=False)
    try:
        cluster.kubelet = AdmissionKubelet(str(cluster.kubeconfig), {PSA_NAMESPACE}).start()
        operator = cluster.operator(settings=fast_settings(resync_seconds=RESYNC))
        yield cluster, operator
    finally:
        cluster.close()


def run_case(env, results, key: str, body: Callable[[FaultyCluster, list[str]], None]) -> None:
    cluster, operator = env
    problems: list[str] = []
    try:
        body(cluster, problems)
    except AssertionError as e:
        problems.append(str(e))
    if not operator.alive:
        problems.append(f"the operator died: {operator.error!r}")
    case = CASES[key]
    results.add("guards", key, kind=case.kind, what=case.what,
                outcome=case.outcome if not problems else "FAILED: " + "; ".join(problems)[:300])
    assert not problems, "\n".join(problems)


# --- helpers ----------------------------------------------------------------------------------------------


def res(cluster: FaultyCluster, api_version: str, kind: str):
    return cluster.api.resources.get(api_version=api_version, kind=kind)


def read(cluster: FaultyCluster, api_version: str, kind: str, ns: str, name: str) -> dict | None:
    try:
        return res(cluster, api_version, kind).get(name=name, namespace=ns).to_dict()
    except NotFoundError:
        return None


def ld(name: str = "chat", *, cache: dict | None = None) -> dict:
    doc = chat_doc(name)
    if cache is None:
        doc["spec"]["source"].pop("cache", None)
    else:
        doc["spec"]["source"]["cache"] = cache
    return doc


def warnings(cluster: FaultyCluster, ns: str, reason: str | None = None, name: str = "chat") -> list[dict]:
    return [e for e in cluster.events(namespace=ns)
            if e.get("type") == "Warning" and e["involvedObject"]["name"] == name
            and e["involvedObject"]["kind"] == KIND and (reason is None or e["reason"] == reason)]


def condition(status: dict, ctype: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), {})


def check(problems: list[str], ok: bool, what: str) -> None:
    if not ok:
        problems.append(what)


def wake_everyone(cluster: FaultyCluster, seconds: float, every: float = 0.25) -> None:
    """Change a Node's labels every `every` seconds: each change wakes every LlamaDeployment (a pass each)."""
    nodes = res(cluster, "v1", "Node")
    name = cluster.node_manifests[0]["metadata"]["name"]
    deadline, i = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        i += 1
        nodes.patch(name=name, body={"metadata": {"labels": {"reliability.test/wake": str(i)}}},
                    content_type="application/merge-patch+json")
        time.sleep(every)


def delete_all(cluster: FaultyCluster, ns: str, name: str = "chat") -> None:
    if cluster.get(name, ns) is not None:
        cluster.delete(name, ns)
    wait_until(lambda: cluster.get(name, ns) is None, 10, f"{ns}/{name} to be deleted", retry_errors=True)


def owned_by(obj: dict, owner: dict) -> bool:
    return any(r.get("uid") == owner["metadata"]["uid"] and r.get("controller")
               for r in obj["metadata"].get("ownerReferences") or [])


def operator_writes(cluster: FaultyCluster, since: int, what: str) -> list[str]:
    return [w for w in writes_by_port(cluster, cluster.operator_port, since) if what in w]


# --- objects of the same name ------------------------------------------------------------------------------


def _conflict(cluster: FaultyCluster, problems: list[str], ns: str, api_version: str, kind: str, foreign: dict,
              doc: dict, then_remove: bool) -> None:
    """Create `foreign` (of `kind`), then the LlamaDeployment `doc`: a conflict is reported once and the
    object never changes; with `then_remove`, removing it lets the operator converge."""
    made = res(cluster, api_version, kind).create(namespace=ns, body=foreign).to_dict()
    name = made["metadata"]["name"]
    mark = len(cluster.server.requests())
    owner = cluster.create(doc, ns)
    st = cluster.wait_phase("chat", "Degraded", 30, namespace=ns, generation=True)
    check(problems, f"{kind} {ns}/{name}" in st.get("message", "") and
          f"Rename the LlamaDeployment or remove the {kind}" in st.get("message", ""),
          f"the message does not name the {kind} and the fix: {st.get('message')!r}")
    ready = condition(st, "Ready")
    check(problems, ready.get("status") == "False" and ready.get("reason") == "OwnershipConflict",
          f"Ready condition: {ready}")
    wake_everyone(cluster, 2.0)  # passes, and a resync: still one Event, and no write to the object
    conflicts = warnings(cluster, ns, "OwnershipConflict")
    check(problems, len(conflicts) == 1 and len(warnings(cluster, ns)) == 1,
          f"Warning Events: {[(e['reason'], e['message'][:80]) for e in warnings(cluster, ns)]}")
    plural = {"Service": "/services/", "Deployment": "/deployments/", "PersistentVolumeClaim": "/persistentvolumeclaims/"}[kind]
    patches = [w for w in operator_writes(cluster, mark, plural + name) if w.startswith(("PATCH", "PUT", "DELETE"))]
    check(problems, not patches, f"the operator wrote to the {kind}: {patches}")
    now = read(cluster, api_version, kind, ns, name)
    check(problems, now is not None and now["metadata"]["resourceVersion"] == made["metadata"]["resourceVersion"],
          f"the {kind} changed: {made} -> {now}")
    if kind != "Deployment":
        dep = read(cluster, "apps/v1", "Deployment", ns, "chat")
        if kind == "PersistentVolumeClaim":
            check(problems, dep is None, "a Deployment mounting another app's claim was created")
        else:
            check(problems, dep is not None and owned_by(dep, owner), "the operator's own Deployment is missing")
    delete_all(cluster, ns)
    after = read(cluster, api_version, kind, ns, name)
    check(problems, after is not None and after["metadata"]["resourceVersion"] == made["metadata"]["resourceVersion"],
          f"after the LlamaDeployment was deleted, the {kind} is {'gone' if after is None else 'changed'}")
    if then_remove:  # the fix the message gives: remove the object; the operator then makes its own
        owner = cluster.create(doc, ns)
        cluster.wait_phase("chat", "Degraded", 30, namespace=ns, generation=True)
        res(cluster, api_version, kind).delete(name=name, namespace=ns)
        cluster.wait_converged(ns, ["chat"], timeout=30)
        mine = read(cluster, api_version, kind, ns, name)
        check(problems, mine is not None and owned_by(mine, owner), f"no {kind} of the operator's after the removal")
        check(problems, len(warnings(cluster, ns, "OwnershipConflict")) == 2, "not one OwnershipConflict Event each")
        delete_all(cluster, ns)
    else:
        res(cluster, api_version, kind).delete(name=name, namespace=ns)


def web_service(labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "chat", "labels": labels or {"app": "web"}},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "web", "port": 80, "targetPort": 8080}]}}


def test_a_service_of_the_same_name(env, module_results):
    def body(cluster, problems):
        _conflict(cluster, problems, "conflict-svc", "v1", "Service", web_service(), ld(), then_remove=True)
    run_case(env, module_results, "conflict-service", body)


def test_a_service_of_the_same_name_with_the_operators_labels(env, module_results):
    labels = {**MANAGED_BY, LABEL_DEPLOYMENT: "chat", "app": "web"}

    def body(cluster, problems):
        _conflict(cluster, problems, "conflict-svc-labels", "v1", "Service", web_service(labels), ld(),
                  then_remove=False)
    run_case(env, module_results, "conflict-service-labelled", body)


def test_a_deployment_of_the_same_name(env, module_results):
    web = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "chat", "labels": {"app": "web"}},
           "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                    "template": {"metadata": {"labels": {"app": "web"}},
                                 "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}}}}

    def body(cluster, problems):
        _conflict(cluster, problems, "conflict-dep", "apps/v1", "Deployment", web, ld(), then_remove=False)
    run_case(env, module_results, "conflict-deployment", body)


def _claim(name: str, size: str = "10Gi") -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "labels": {"app": "other"}},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}}


def test_a_claim_of_the_same_name(env, module_results):
    def body(cluster, problems):
        _conflict(cluster, problems, "conflict-claim", "v1", "PersistentVolumeClaim", _claim("chat-model-cache"),
                  ld(cache={"size": "100Gi"}), then_remove=True)
        # Converged with its own claim (100Gi), created after the other app's was removed.
    run_case(env, module_results, "conflict-claim", body)


def test_an_existing_claim_named_in_the_spec_is_used(env, module_results):
    def body(cluster, problems):
        ns = "existing-claim"
        made = res(cluster, "v1", "PersistentVolumeClaim").create(namespace=ns, body=_claim("shared-models")).to_dict()
        cluster.create(ld(cache={"existingClaim": "shared-models"}), ns)
        cluster.wait_converged(ns, ["chat"])
        dep = read(cluster, "apps/v1", "Deployment", ns, "chat")
        claims = [v["persistentVolumeClaim"]["claimName"] for v in dep["spec"]["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]
        check(problems, claims == ["shared-models"], f"the Deployment mounts {claims}")
        check(problems, not warnings(cluster, ns), f"Warnings: {[e['reason'] for e in warnings(cluster, ns)]}")
        delete_all(cluster, ns)
        now = read(cluster, "v1", "PersistentVolumeClaim", ns, "shared-models")
        check(problems, now is not None and now["metadata"]["resourceVersion"] == made["metadata"]["resourceVersion"],
              "the named claim changed or went")
    run_case(env, module_results, "existing-claim", body)


# --- hand edits ------------------------------------------------------------------------------------------------

EDITS_NS = "edits"
EDITS = {
    # key -> (kind, patch, content type)
    "edit-image": ("Deployment", [{"op": "replace", "path": "/spec/template/spec/containers/0/image",
                                   "value": "docker.io/evil/miner:latest"}], "application/json-patch+json"),
    "edit-privileged": ("Deployment", [{"op": "add", "path": "/spec/template/spec/containers/0/securityContext",
                                        "value": {"privileged": True}}], "application/json-patch+json"),
    "edit-hostpath": ("Deployment", [
        {"op": "add", "path": "/spec/template/spec/volumes/-", "value": {"name": "host", "hostPath": {"path": "/"}}},
        {"op": "add", "path": "/spec/template/spec/containers/0/volumeMounts/-",
         "value": {"name": "host", "mountPath": "/host"}}], "application/json-patch+json"),
    "edit-replicas": ("Deployment", {"spec": {"replicas": 3}}, "application/merge-patch+json"),
    "edit-service": ("Service", {"spec": {"selector": {"app": "nothing"},
                                          "ports": [{"name": "http", "port": 9999, "targetPort": "http"}]}},
                     "application/merge-patch+json"),
}


@pytest.fixture(scope="module")
def edited(env):
    """One LlamaDeployment, converged, whose Deployment and Service the edit cases change by hand."""
    cluster, _ = env
    cluster.create(ld(), EDITS_NS)
    cluster.wait_converged(EDITS_NS, ["chat"])
    yield {kind: read(cluster, api_version, kind, EDITS_NS, "chat")
           for api_version, kind in (("apps/v1", "Deployment"), ("v1", "Service"))}
    delete_all(cluster, EDITS_NS)


@pytest.mark.parametrize("key", list(EDITS))
def test_a_hand_edit_is_written_back(env, edited, module_results, key):
    kind, patch, content_type = EDITS[key]
    api_version = "apps/v1" if kind == "Deployment" else "v1"

    def body(cluster, problems):
        before = len(warnings(cluster, EDITS_NS, "DriftCorrected"))
        changed = res(cluster, api_version, kind).patch(name="chat", namespace=EDITS_NS, body=patch,
                                                        content_type=content_type).to_dict()
        assert changed["spec"] != edited[kind]["spec"], "the edit changed nothing"
        wait_until(lambda: read(cluster, api_version, kind, EDITS_NS, "chat")["spec"] == edited[kind]["spec"], 10,
                   f"the {kind}'s spec to be written back", retry_errors=True)
        wait_until(lambda: len(warnings(cluster, EDITS_NS, "DriftCorrected")) > before, 10, "a DriftCorrected Event",
                   retry_errors=True)
        cluster.wait_converged(EDITS_NS, ["chat"], timeout=30)
        drift = warnings(cluster, EDITS_NS, "DriftCorrected")
        check(problems, len(drift) == before + 1, f"{len(drift) - before} DriftCorrected Events")
        check(problems, f"{kind} {EDITS_NS}/chat" in drift[-1]["message"], f"the Event says {drift[-1]['message']!r}")
        others = [e["reason"] for e in warnings(cluster, EDITS_NS) if e["reason"] != "DriftCorrected"]
        check(problems, not others, f"other Warnings: {others}")
    run_case(env, module_results, key, body)


def test_an_unchanged_deployment_costs_no_write_through_resyncs(env, edited, module_results):
    def body(cluster, problems):
        cluster.wait_converged(EDITS_NS, ["chat"])
        mark = len(cluster.server.requests())
        time.sleep(3 * RESYNC)
        writes = writes_by_port(cluster, cluster.operator_port, mark)
        check(problems, not writes, f"{len(writes)} writes in {3 * RESYNC:g} s: {writes[:5]}")
    run_case(env, module_results, "resync-quiet", body)


# --- refusals ---------------------------------------------------------------------------------------------------

KYVERNO = ('admission webhook "validate.kyverno.svc-fail" denied the request: policy Deployment/{ns}/chat for '
           'resource violation: require-run-as-nonroot: autogen-run-as-non-root: validation error: Running as root '
           'is not allowed. The fields spec.securityContext.runAsNonRoot must be set to true.')
QUOTA = ('persistentvolumeclaims "chat-model-cache" is forbidden: exceeded quota: storage, requested: '
         'requests.storage=100Gi, used: requests.storage=0, limited: requests.storage=50Gi')


def _refused(cluster: FaultyCluster, problems: list[str], logs, ns: str, doc: dict, resource, code: int,
             message: str, plural: str) -> None:
    """An admission check refuses `resource` in `ns`: the LlamaDeployment is Invalid with the message, once;
    wakes do not resend the write; once the check is gone, it converges (at the next resync)."""
    def refuse(r, obj, old):
        return (code, message) if r == resource and obj["metadata"].get("namespace") == ns else None
    cluster.emulator.admission.append(refuse)
    try:
        first = len(logs.records)
        cluster.create(doc, ns)
        st = cluster.wait_phase("chat", "Invalid", 30, namespace=ns, generation=True)
        check(problems, message in st.get("message", ""), f"the message lacks the server's: {st.get('message')!r}")
        check(problems, condition(st, "Ready").get("reason") == "ObjectRefused", f"Ready: {condition(st, 'Ready')}")
        wait_until(lambda: warnings(cluster, ns, "ObjectRefused"), 10, "the ObjectRefused Event", retry_errors=True)
        if resource == CLAIMS:
            check(problems, read(cluster, "apps/v1", "Deployment", ns, "chat") is None,
                  "a Deployment mounting the refused claim was created")
        mark = len(cluster.server.requests())
        window = 3.0
        wake_everyone(cluster, window)
        sent = [w for w in operator_writes(cluster, mark, f"/namespaces/{ns}/{plural}") if w.startswith("POST")]
        check(problems, len(sent) <= window / RESYNC + 1, f"the refused write was sent {len(sent)} times in {window:g} s")
        refused = warnings(cluster, ns)
        check(problems, [e["reason"] for e in refused] == ["ObjectRefused"],
              f"Warning Events: {[(e['reason'], e['message'][:60]) for e in refused]}")
        mine = [r for r in logs.records[first:] if r.name.startswith("llama_operator")]
        traced = [r.getMessage() for r in mine if r.exc_info or r.levelname in ("ERROR", "CRITICAL")]
        check(problems, not traced, f"errors or tracebacks logged: {traced[:2]}")
        said = [r.getMessage() for r in mine if message in r.getMessage()]
        check(problems, 1 <= len(said) <= 2, f"{len(said)} log lines with the refusal")
    finally:
        cluster.emulator.admission.remove(refuse)
    cluster.wait_converged(ns, ["chat"], timeout=RESYNC * 2 + 20)
    check(problems, len(warnings(cluster, ns, "ObjectRefused")) == 1, "another ObjectRefused Event")
    delete_all(cluster, ns)


def test_a_deployment_refused_by_an_admission_policy(env, module_results, operator_logs):
    def body(cluster, problems):
        ns = "refused-admission"
        _refused(cluster, problems, operator_logs, ns, ld(), DEPLOYMENTS, 400, KYVERNO.format(ns=ns), "deployments")
    run_case(env, module_results, "refused-admission", body)


def test_a_claim_refused_by_a_quota(env, module_results, operator_logs):
    def body(cluster, problems):
        _refused(cluster, problems, operator_logs, "refused-quota", ld(cache={"size": "100Gi"}), CLAIMS, 403, QUOTA,
                 "persistentvolumeclaims")
    run_case(env, module_results, "refused-quota", body)


@pytest.mark.parametrize("key, name", [("name-long", "a" * 64), ("name-dot", "my.chat"), ("name-digit", "1chat")])
def test_a_name_no_service_can_have(env, module_results, key, name):
    def body(cluster, problems):
        ns = key
        cluster.create(ld(name), ns)
        st = cluster.wait_phase(name, "Invalid", 30, namespace=ns, generation=True)
        check(problems, "metadata.name" in st.get("message", ""), f"the message: {st.get('message')!r}")
        wait_until(lambda: warnings(cluster, ns, name=name), 10, "a Warning Event", retry_errors=True)
        time.sleep(RESYNC)
        events = [(e["reason"], e["message"]) for e in warnings(cluster, ns, name=name)]
        check(problems, len(events) == 1 and events[0][0] == "InvalidSpec" and "metadata.name" in events[0][1],
              f"Warning Events: {events}")
        made = [f"{kind} {o['metadata']['name']}" for api_version, kind in
                (("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "PersistentVolumeClaim"))
                for o in cluster.list(api_version, kind, ns)]
        check(problems, not made, f"created: {made}")
        delete_all(cluster, ns, name)
    run_case(env, module_results, key, body)


#: Llama 3.2 11B Vision runs on vLLM 0.10.2, whose image prepares no user: its pods run as root
#: (catalog/engines.yaml runAs), which Pod Security "restricted" refuses.
ROOT_MODEL = "llama-3.2-11b-vision-instruct"


def test_pods_refused_by_pod_security_admission(env, module_results):
    def body(cluster, problems):
        ns = PSA_NAMESPACE
        doc = ld()
        doc["spec"]["model"] = ROOT_MODEL
        # Its 8 concurrent 512-token prompts, prefilled together, take about 1.25 s on an L4 (the estimator's
        # vLLM TTFT): a 2 s TTFT keeps the premise, a plan whose pods the admission refuses.
        doc["spec"]["slo"]["ttftP95"] = "2s"
        cluster.create(doc, ns)
        dep = wait_until(lambda: read(cluster, "apps/v1", "Deployment", ns, "chat"), 20, "the Deployment",
                         retry_errors=True)
        assert restricted_violations(dep["spec"]["template"]["spec"]), \
            f"the premise no longer holds: the pods of {ROOT_MODEL} now comply with Pod Security restricted"
        st = cluster.wait_phase("chat", "Degraded", 30, namespace=ns, generation=True)
        check(problems, 'violates PodSecurity "restricted:latest"' in st.get("message", ""),
              f"the message: {st.get('message')!r}")
        for ctype in ("Ready", "Progressing"):
            c = condition(st, ctype)
            check(problems, c.get("status") == "False" and c.get("reason") == "ReplicaFailure" and
                  "violates PodSecurity" in c.get("message", ""), f"{ctype} condition: {c}")
        wait_until(lambda: warnings(cluster, ns, "ReplicaFailure"), 10, "the ReplicaFailure Event", retry_errors=True)
        wake_everyone(cluster, 2.0)
        events = [(e["reason"], e["message"][:80]) for e in warnings(cluster, ns)]
        check(problems, [r for r, _ in events] == ["ReplicaFailure"], f"Warning Events: {events}")
        check(problems, "violates PodSecurity" in warnings(cluster, ns, "ReplicaFailure")[0]["message"],
              "the Event lacks the admission error")
        delete_all(cluster, ns)
    run_case(env, module_results, "pods-refused", body)
