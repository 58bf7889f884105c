"""The reliability suite's machinery, built on the test kit (tests/kit): an API emulator with fault
injection that can be taken off the network and brought back on the same port, a kit Cluster on it
(FaultyCluster) with the operator in a thread (kit.operator) or in a process of its own, a simulated
kubelet, and a fingerprint of everything the operator wrote.

Used by tests/reliability/ and by benchmarks/soak.py (which puts this folder and tests/ on sys.path).

Faults (`Fault`) are matched against each request before the emulator stores anything:

* ``mode='before'``: the request is refused before it is applied (a real API server's 429, a 500 from
  an admission webhook, a conflict, a network failure on the way in).
* A 409 on a patch (``mode='before'``) also changes the object (an annotation of the test's own), as a
  real conflict means another writer got in between: the resourceVersion moves and watchers see it.
* ``mode='after'``: the request is applied, then answered with the error (the answer is lost: what
  kmock's own error injection does, see TOOLCHAIN.md). A create answered 500 is stored, and its retry
  gets 409; a patch answered 500 is applied.
* ``kind='hang'``: the request is held until `Fault.release()` (or `hang_limit`), then refused.
* ``kind='gone'`` / ``kind='end'`` (watches): the stream answers one ``ERROR 410 Gone`` event, or ends at
  once with no event.

Everything here talks to 127.0.0.1 only, and every wait is bounded.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml

from llama_operator.api import API_VERSION, KIND
from llama_operator.crd import crd_manifest
from llama_operator.live import SERVICE_ASSIGNED
from llama_operator.ownership import LABEL_DEPLOYMENT, MANAGED_BY
from llama_operator.sandbox.emulator import ClusterEmulator, declare_crd
from llama_operator.sandbox.kubelet import SimulatedKubelet
from llama_operator.sandbox.reads import WATCH_CONTENT_TYPE
from llama_operator.sandbox.demo import load_docs
from llama_operator.sandbox.server import kubeconfig

from kit.cluster import Cluster
from kit.examples import cluster_nodes, example
from kit.operator import OperatorThread
from kit.paths import PEERING_CRDS, ROOT
from kit.poll import wait_until

OPERATOR_MAIN = Path(__file__).resolve().parent / "operator_main.py"

ANY = "*"
OWNED_KINDS = (("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "PersistentVolumeClaim"))


# --- faults ---------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Fault:
    """One injected fault: which requests it matches, what they get, how often."""

    action: str = ANY  # create | update (PATCH) | delete | fetch | list | watch | *
    plural: str = ANY  # deployments, services, persistentvolumeclaims, llamadeployments, events, ...
    subresource: str | None = None  # None: the main resource only; 'status'; ANY
    namespace: str | None = ANY
    name: str | None = ANY
    port: int | None = None  # only requests that came in on this port (None: any)
    kind: str = "status"  # status | hang | gone | end
    status: int = 500
    mode: str = "before"  # before | after (see the module docstring)
    retry_after: int | None = None  # seconds, for 429
    times: int | None = 1  # how many requests it answers; None: until `until` or removed
    until: float | None = None  # time.monotonic() deadline; None: no deadline
    hang_limit: float = 30.0
    hits: int = 0
    _released: threading.Event = dataclasses.field(default_factory=threading.Event)

    def matches(self, request: kmock.Request) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.until is not None and time.monotonic() > self.until:
            return False
        res = request.resource
        action = (request.action.value.lower() if request.action is not None else "")
        return (
            (self.action == ANY or self.action == action)
            and (self.plural == ANY or (res is not None and res.plural == self.plural))
            and (self.subresource == ANY or self.subresource == request.subresource)
            and (self.namespace == ANY or self.namespace == request.namespace)
            and (self.name == ANY or self.name == request.name)
            and (self.port is None or request.url.port == self.port)
        )

    def release(self) -> None:
        self._released.set()

    def describe(self) -> str:
        what = {"status": f"{self.status}" + (f" (Retry-After {self.retry_after}s)" if self.retry_after else ""),
                "hang": "hang", "gone": "410 Gone", "end": "watch ends"}[self.kind]
        return f"{what} on {self.action} {self.plural}{'/' + self.subresource if self.subresource else ''}"


def _status_body(code: int, reason: str, message: str, **details: Any) -> dict:
    return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "code": code,
            "reason": reason, "message": message, "details": details}


_REASONS = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
            504: "Timeout", 410: "Gone"}


@dataclasses.dataclass(frozen=True)
class Seen:
    """One request, as the tests count them."""

    port: int | None
    method: str
    path: str
    watch: bool
    agent: str


@attrs.define(kw_only=True)
class FaultyEmulator(ClusterEmulator):
    """The project's emulator, with `faults` consulted on every request.

    kmock keeps every request and scans them all for each new one (its reactions' filters), so a long
    run slows down with the count; this subclass keeps a compact log of its own (`seen`) and only the
    last few kmock requests."""

    faults: list[Fault] = attrs.field(factory=list)
    seen: list[Seen] = attrs.field(factory=list)
    keep_requests: int = 50
    _fault_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def inject(self, fault: Fault) -> Fault:
        with self._fault_lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._fault_lock:
            for f in self.faults:
                f.release()
            self.faults.clear()

    def _take(self, request: kmock.Request, mode: str) -> Fault | None:
        with self._fault_lock:
            for fault in self.faults:
                if fault.mode == mode and fault.matches(request):
                    fault.hits += 1
                    return fault
        return None

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        self.seen.append(Seen(request.url.port, request.method.value, request.url.path,
                              request.params.get("watch") == "true", request.headers.get("User-Agent", "")))
        if len(self._requests) > 2 * self.keep_requests:
            del self._requests[:-self.keep_requests]
        fault = self._take(request, "before")
        if fault is not None:
            return await self._answer(fault, request)
        response = await super()._handle(request)
        fault = self._take(request, "after")
        if fault is not None and not response.prepared:  # applied; the answer is lost
            return await self._answer(fault, request)
        return response

    async def _someone_else_wrote(self, request: kmock.Request) -> None:
        """What a real 409 Conflict on a patch means: another client changed the object in between (its
        resourceVersion moved on, and watchers get an event). Emulated with an annotation of our own."""
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                return
            obj = copy.deepcopy(self.objects[key].raw)
            annotations = obj["metadata"].setdefault("annotations", {})
            annotations["reliability.test/conflicting-writes"] = str(
                int(annotations.get("reliability.test/conflicting-writes", "0")) + 1)
            self._store(key, obj, "MODIFIED")

    async def _answer(self, fault: Fault, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if fault.kind == "hang":
            deadline = time.monotonic() + fault.hang_limit
            while not fault._released.is_set() and time.monotonic() < deadline and not self._closed:
                await asyncio.sleep(0.05)
            body = _status_body(503, "ServiceUnavailable", "injected: the request hung and was dropped")
            return aiohttp.web.json_response(body, status=503)
        if fault.kind == "gone":
            event = {"type": "ERROR", "object": _status_body(410, "Expired", "injected: too old resource version")}
            return aiohttp.web.Response(body=json.dumps(event) + "\n", headers={"Content-Type": WATCH_CONTENT_TYPE})
        if fault.kind == "end":
            return aiohttp.web.Response(body=b"", headers={"Content-Type": WATCH_CONTENT_TYPE})
        code = fault.status
        headers = {}
        details: dict[str, Any] = {"causes": [{"message": f"injected {code}"}]}
        if code == 429 and fault.retry_after is not None:
            headers["Retry-After"] = str(fault.retry_after)
            details["retryAfterSeconds"] = fault.retry_after
        if code == 409 and request.action == kmock.action.CREATE:
            reason = "AlreadyExists"
        else:
            reason = _REASONS.get(code, "InternalError")
        if code == 409 and request.action == kmock.action.UPDATE and fault.mode == "before":
            await self._someone_else_wrote(request)
        body = _status_body(code, reason, f"injected {code} {reason}", **details)
        return aiohttp.web.json_response(body, status=code, headers=headers)


# --- the API server, on ports that can be taken down and brought back ---------------------------------


class ApiServer:
    """A FaultyEmulator served from a background thread on one or more 127.0.0.1 ports.

    Each port can be stopped and started again (the same port, the same stored objects): the operator
    can be given its own port and cut off while the tests and the kubelet keep theirs.
    """

    def __init__(self, **emulator_kwargs: Any) -> None:
        self.emulator = FaultyEmulator(**emulator_kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._runners: dict[int, aiohttp.web.BaseRunner] = {}

    def start(self) -> "ApiServer":
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="api-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("the API server thread did not start")
        return self

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with self.emulator:
            self._ready.set()
            await self._stop.wait()
            self.emulator.close_watches()
            for runner in list(self._runners.values()):
                await runner.cleanup()

    def call(self, coro_fn: Callable[[], Any], timeout: float = 15.0) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(timeout)

    def serve(self, port: int = 0) -> int:
        """Serve on `port` (0: a free one); returns the port."""
        async def _serve() -> int:
            sock = socket.create_server(("127.0.0.1", port))
            actual = sock.getsockname()[1]
            runner = aiohttp.web.ServerRunner(aiohttp.web.Server(self.emulator, access_log=None),
                                              shutdown_timeout=0.5)
            await runner.setup()
            await aiohttp.web.SockSite(runner, sock).start()
            self._runners[actual] = runner
            return actual
        return self.call(_serve)

    def take_down(self, port: int) -> None:
        """Stop answering on `port`: open connections (watches too) are closed, new ones refused."""
        async def _down() -> None:
            runner = self._runners.pop(port)
            self.emulator.close_watches()  # ends every watch stream now; the other ports have none
            await runner.cleanup()
            self.emulator._closed = False
        self.call(_down)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(15)

    def url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}"

    def write_kubeconfig(self, port: int, path: Path) -> Path:
        path.write_text(yaml.safe_dump(kubeconfig(self.url(port)), sort_keys=False))
        return path

    # --- reading the store without racing the server's loop ---

    def live_objects(self) -> list[dict]:
        async def _snap() -> list[dict]:
            return [copy.deepcopy(o.raw) for o in self.emulator.objects.values() if not o.deleted]
        return self.call(_snap)

    def requests(self) -> list[Seen]:
        async def _reqs() -> list[Seen]:
            return list(self.emulator.seen)
        return self.call(_reqs)


# --- the operator -------------------------------------------------------------------------------------


class OperatorProcess:
    """The operator in a process of its own (tests/reliability/operator_main.py): killable with SIGKILL,
    and its memory measurable on its own."""

    def __init__(self, kubeconfig_path: Path, *, log_path: Path, error_backoff: float = 0.5,
                 watch_timeout: int = 10, resync: float = 60.0) -> None:
        self.argv = [sys.executable, str(OPERATOR_MAIN), "--kubeconfig", str(kubeconfig_path),
                     "--error-backoff", str(error_backoff), "--watch-timeout", str(watch_timeout),
                     "--resync", str(resync)]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> "OperatorProcess":
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "operator"), env.get("PYTHONPATH", "")])
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"OPERATOR READY" in self.log_path.read_bytes():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"the operator process exited: {self.log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        self.kill()
        raise TimeoutError("the operator process did not become ready")

    def rss_bytes(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as when a node dies or the OOM killer strikes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        with contextlib.suppress(Exception):
            self._log.close()

    def terminate(self, timeout: float = 20) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(Exception):
            self._log.close()


# --- the cluster, as the tests see it ------------------------------------------------------------------


class FaultyCluster(Cluster):
    """A kit Cluster on an ApiServer of its own: the CRDs declared, the nodes loaded, a port for the tests
    and the kubelet, and one for the operator (which can be taken down); faults injected on request, and
    the operators started here (threads or processes) stopped at close. Each test names its namespace.

    The nodes are `copies` copies of examples/clusters/<pool> (default: two L4 pools, 8 GPUs), so that a
    rollout's surge pod or a deleted deployment's last pods never leave a test short of capacity (the
    simulated kubelet does not reschedule a pod it once left Pending)."""

    def __init__(self, workdir: Path, pool: str = "l4-pool.yaml", *, copies: int = 2, kubelet: bool = True,
                 **emulator_kwargs: Any) -> None:
        self.workdir = workdir
        self.server = ApiServer(**emulator_kwargs).start()
        self.emulator = self.server.emulator
        declare_crd(self.emulator, crd_manifest())
        for crd in load_docs(PEERING_CRDS):
            declare_crd(self.emulator, crd)
        self.test_port = self.server.serve()
        self.operator_port = self.server.serve()
        self.operator_kubeconfig = self.server.write_kubeconfig(self.operator_port, workdir / "kubeconfig-operator")
        super().__init__(self.server.write_kubeconfig(self.test_port, workdir / "kubeconfig-tests"), namespace=None,
                         retry_errors=True)
        self.node_manifests = []
        for i in range(copies):
            for n in cluster_nodes(pool):
                n = copy.deepcopy(n)
                if i:
                    n["metadata"]["name"] += f"-{i}"
                    n["metadata"].setdefault("labels", {})["kubernetes.io/hostname"] = n["metadata"]["name"]
                self.node_manifests.append(n)
        self.add_nodes(self.node_manifests)
        self.kubelet = SimulatedKubelet(self.kubeconfig, interval=0.2).start() if kubelet else None
        self.operators: list[Any] = []

    def close(self) -> None:
        for op in reversed(self.operators):
            with contextlib.suppress(Exception):
                op.stop() if isinstance(op, OperatorThread) else op.kill()
        if self.kubelet is not None:
            self.kubelet.stop()
        self.emulator.clear_faults()
        with contextlib.suppress(Exception):
            super().close()
        self.server.stop()

    # --- operators ---

    def operator(self, *, port: int | None = None, **kwargs: Any) -> OperatorThread:
        path = self.operator_kubeconfig if port is None else \
            self.server.write_kubeconfig(port, self.workdir / f"kubeconfig-{port}")
        op = OperatorThread(path, **kwargs).start()
        self.operators.append(op)
        return op

    def operator_process(self, **kwargs: Any) -> OperatorProcess:
        op = OperatorProcess(self.operator_kubeconfig, log_path=self.workdir / f"operator-{len(self.operators)}.log",
                             **kwargs).start()
        self.operators.append(op)
        return op

    # --- faults ---

    def inject(self, **kwargs: Any) -> Fault:
        return self.emulator.inject(Fault(**kwargs))

    def end_watches(self) -> None:
        """End every open watch stream now (clients reconnect, and meet any fault injected for watches)."""
        async def _end() -> None:
            self.emulator.close_watches()
            await asyncio.sleep(0.05)
            self.emulator._closed = False
        self.server.call(_end)

    # --- convergence ---

    def wait_converged(self, namespace: str, names: Iterable[str], timeout: float = 40) -> None:
        """Every named LlamaDeployment Ready for its generation, and the owned objects exactly as the
        current status' plan renders them (one of each, nothing else in the namespace)."""
        names = sorted(names)

        def ok() -> bool:
            for n in names:
                obj = self.get(n, namespace)
                st = (obj or {}).get("status") or {}
                if st.get("phase") != "Ready" or st.get("observedGeneration") != obj["metadata"]["generation"]:
                    return False
            fp = fingerprint(self, namespace)
            return sorted(fp["deployments"]) == names and sorted(fp["services"]) == names
        wait_until(ok, timeout, f"{namespace}: {names} converged", retry_errors=True)


# --- what the operator wrote, comparable across runs ---------------------------------------------------


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


OPERATOR_EVENT_SOURCE = "llama-operator"


def fingerprint(cluster: FaultyCluster, namespace: str) -> dict:
    """Everything the operator wrote in `namespace`, without what differs from run to run (uids,
    resourceVersions, timestamps, event names, a Service's allocated addresses): the owned objects' specs
    and labels, the status' phase/variant/runtime/ready, and the operator's events as a multiset of
    (object, type, reason)."""
    out: dict[str, Any] = {}
    for api_version, kind in OWNED_KINDS:
        objs = cluster.list(api_version, kind, namespace)
        key = {"Deployment": "deployments", "Service": "services", "PersistentVolumeClaim": "claims"}[kind]
        entries: dict[str, Any] = {}
        for o in objs:
            name = o["metadata"]["name"]
            labels = o["metadata"].get("labels") or {}
            spec = {k: v for k, v in (o.get("spec") or {}).items() if k not in SERVICE_ASSIGNED}  # per cluster
            entries[name] = _digest({"spec": spec, "labels": labels,
                                     "owners": [(r["kind"], r["name"]) for r in o["metadata"].get("ownerReferences") or []]})
        out[key] = entries
    out["status"] = {}
    for o in cluster.list(API_VERSION, KIND, namespace):
        st = o.get("status") or {}
        out["status"][o["metadata"]["name"]] = {k: st.get(k) for k in ("phase", "variant", "runtime", "ready")}
    events = [e for e in cluster.events(namespace=namespace)
              if (e.get("source") or {}).get("component") == OPERATOR_EVENT_SOURCE]
    out["events"] = sorted(Counter((e["involvedObject"]["name"], e["type"], e["reason"]) for e in events).items())
    return out


def orphans(cluster: FaultyCluster) -> list[str]:
    """Owned-kind objects whose owner LlamaDeployment does not exist (by uid), and objects of ours that
    have no owner at all."""
    lds = {o["metadata"]["uid"] for o in cluster.list(API_VERSION, KIND)}
    bad = []
    for api_version, kind in OWNED_KINDS:
        for o in cluster.list(api_version, kind):
            labels = o["metadata"].get("labels") or {}
            if labels.get("app.kubernetes.io/managed-by") != MANAGED_BY["app.kubernetes.io/managed-by"]:
                continue
            refs = [r["uid"] for r in o["metadata"].get("ownerReferences") or [] if r.get("kind") == KIND]
            if not refs or not set(refs) & lds:
                bad.append(f"{kind} {o['metadata']['namespace']}/{o['metadata']['name']}")
    return bad


def writes_by_port(cluster: FaultyCluster, port: int, since: int = 0) -> list[str]:
    """The write requests (POST/PATCH/PUT/DELETE) that came in on `port`, as 'METHOD path'."""
    return [f"{r.method} {r.path}" for r in cluster.server.requests()[since:]
            if r.port == port and r.method in ("POST", "PATCH", "PUT", "DELETE")]


# --- the lifecycle every fault case runs ---------------------------------------------------------------

UPDATE = {"model": "llama-3.2-3b-instruct", "replicas": 2}


def chat_doc(name: str = "chat") -> dict:
    """examples/chat.yaml (Llama 3.1 8B, an HF token Secret reference) with a model-cache claim."""
    doc = example("chat.yaml")
    doc["metadata"] = {"name": name}
    doc["spec"]["source"]["cache"] = {"size": "100Gi"}
    return doc


def create_and_update(cluster: FaultyCluster, namespace: str, name: str = "chat", timeout: float = 40) -> None:
    """Create the chat deployment, wait until it is Ready, change model and replicas, wait again."""
    cluster.create(chat_doc(name), namespace)
    cluster.wait_converged(namespace, [name], timeout)
    cluster.patch_spec(name, UPDATE, namespace)
    cluster.wait_converged(namespace, [name], timeout)


def settle(cluster: FaultyCluster, namespace: str, expected: dict, timeout: float = 15, quiet: float = 0.6) -> dict:
    """Wait until the namespace's fingerprint equals `expected` and stays so for `quiet` seconds.
    Returns the last fingerprint (compare it with `expected` to assert)."""
    deadline = time.monotonic() + timeout
    fp: dict = {}
    while time.monotonic() < deadline:
        try:
            fp = fingerprint(cluster, namespace)
        except Exception:  # noqa: BLE001 - a read during a fault window
            time.sleep(0.1)
            continue
        if fp == expected:
            time.sleep(quiet)
            fp = fingerprint(cluster, namespace)
            if fp == expected:
                return fp
        time.sleep(0.1)
    return fp


def delete_and_wait_gone(cluster: FaultyCluster, namespace: str, name: str = "chat", timeout: float = 20) -> list[str]:
    """Delete the LlamaDeployment; returns what is left of it after `timeout` (empty: all gone)."""
    cluster.delete(name, namespace)

    def left() -> list[str]:
        out = [f"LlamaDeployment {o['metadata']['name']}" for o in cluster.list(API_VERSION, KIND, namespace)
               if o["metadata"]["name"] == name]
        for api_version, kind in OWNED_KINDS:
            out += [f"{kind} {o['metadata']['name']}" for o in cluster.list(api_version, kind, namespace)
                    if (o["metadata"].get("labels") or {}).get(LABEL_DEPLOYMENT) == name]
        return out
    try:
        wait_until(lambda: not left(), timeout, f"{namespace}/{name} and its objects to be gone", retry_errors=True)
    except AssertionError:
        return left()
    return []


def describe_difference(got: dict, want: dict) -> str:
    """What differs between two fingerprints, short enough for an assertion message."""
    parts = []
    for key in sorted(set(got) | set(want)):
        if got.get(key) == want.get(key):
            continue
        if key == "events":
            g, w = Counter(dict(got.get(key) or [])), Counter(dict(want.get(key) or []))
            parts.append(f"events extra {sorted((g - w).items())} missing {sorted((w - g).items())}")
        else:
            parts.append(f"{key}: got {got.get(key)} want {want.get(key)}")
    return "; ".join(parts)
