"""Starting the operator: kopf with the project's handlers, metrics and health endpoints.

Used by `llama-operator run` (in a cluster or against any kubeconfig), by the sandbox and by the
integration tests (in-process, with a stop flag).
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import ipaddress
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import kopf
import kubernetes

from .handlers import register
from .kube import Writer
from .kubeclient import load_client_configuration
from .metrics import OperatorMetrics
from .peering import PeeringGate, own_identity, own_priority
from .state import Key, OperatorState, PodUse, Settings, pod_use

log = logging.getLogger("llama_operator")


def configure_logging(*, verbose: bool = False, json_format: bool = False) -> None:
    """kopf's logging as `llama-operator run` sets it up. kopf's per-object INFO lines ("Handler
    'node_event' succeeded." for every Node, Pod and owned-object update) would bury what the operator
    decides, which it logs itself; -v keeps them. kopf's warnings and errors always show."""
    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON if json_format else kopf.LogFormat.FULL)
    logging.getLogger("llama_operator").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    install_leaderworkerset_filter()


def install_leaderworkerset_filter() -> None:
    """LeaderWorkerSetAbsent on kopf's resource-discovery logger, once."""
    observation = logging.getLogger("kopf._core.reactor.observation")
    if not any(isinstance(f, LeaderWorkerSetAbsent) for f in observation.filters):
        observation.addFilter(LeaderWorkerSetAbsent())


class LeaderWorkerSetAbsent(logging.Filter):
    """kopf warns "Unresolved resources cannot be served" for every resource a handler names that the cluster
    does not serve. LeaderWorkerSet is an optional prerequisite (docs/multinode.md): where it is the only such
    resource, that is no fault, and the line says so at INFO. Any other unresolved resource keeps the warning."""

    PREFIX = "Unresolved resources cannot be served"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno == logging.WARNING and message.startswith(self.PREFIX):
            unresolved = message.split(":", 1)[1].split("Selector(")[1:]
            if unresolved and all("leaderworkerset" in selector for selector in unresolved):
                record.levelno, record.levelname = logging.INFO, "INFO"
                record.msg, record.args = ("LeaderWorkerSet is not installed: replicas stay on one node until its "
                                           "CRD appears (docs/multinode.md)"), ()
        return True


#: Young-generation size and older-generation ratios for the operator process (CPython's defaults:
#: 700, 10, 10). See tune_gc.
GC_THRESHOLDS = (50_000, 50, 100)


def tune_gc() -> None:
    """Collect garbage less often in the operator process. A burst of passes allocates many short-lived
    objects while the process holds a large, long-lived view of the cluster (every Node, Pod and owned
    object); with CPython's defaults a young collection runs every 700 allocations and full collections
    walk that whole view (docs/benchmarks.md has the numbers). Process-wide, so the process's entry point
    calls it (`llama-operator run`), not the library."""
    gc.set_threshold(*GC_THRESHOLDS)


@dataclass
class RunOptions:
    kubeconfig: str | None = None
    namespaces: list[str] = field(default_factory=list)  # empty: all namespaces
    metrics_port: int | None = 8080
    #: Where the metrics and health endpoints listen (`run --metrics-address/--health-address`): every
    #: interface by default, since in a pod Prometheus and the kubelet's probes come to the pod IP.
    metrics_host: str = "0.0.0.0"
    health_port: int | None = 8081
    health_host: str = "0.0.0.0"
    peering: str | None = None  # None: standalone
    settings: Settings = field(default_factory=Settings)
    watch_timeout: int = 300
    #: With `namespaces`: read the Pods of every namespace all the same (ClusterPods), so the GPUs that
    #: other namespaces' pods hold are not taken for free. Needs cluster-wide list/watch on pods; without
    #: it the operator says so and keeps to the watched namespaces' Pods.
    pods_all_namespaces: bool = False
    #: Where the SLO loop observes the model servers (docs/slo-loop.md): pods (their /metrics, directly),
    #: prometheus (the HTTP API at prometheus_url) or off (no loop: what the library and tests default to).
    slo_source: str = "off"
    prometheus_url: str | None = None
    prometheus_token_file: str | None = None


def build(options: RunOptions) -> tuple[kopf.OperatorRegistry, OperatorState]:
    cfg = load_client_configuration(options.kubeconfig)
    registry = kopf.OperatorRegistry()
    register(registry)
    state = OperatorState(Writer(cfg), options.settings, OperatorMetrics(), client_config=cfg,
                          peering_priority=own_priority(options.settings.peering_priority))
    if options.namespaces and options.pods_all_namespaces:
        _register_cluster_pods(registry, ClusterPods(cfg, state, options.watch_timeout))
    state.observer = _observer(options)
    if options.peering is not None:
        state.peering = PeeringGate(_peering_reader(state.writer, options), own_identity(), state.peering_priority,
                                    on_resume=state.wake_all)
    return registry, state


def _observer(options: RunOptions):
    """The SLO loop's source, or None when the loop is off."""
    if options.slo_source == "off":
        return None
    from .observer import Observer, PodScraper, PrometheusSource

    window = options.settings.slo.window.total_seconds()
    if options.slo_source == "prometheus":
        if not options.prometheus_url:
            raise ValueError("the SLO loop's source prometheus needs a Prometheus URL (--prometheus-url)")
        return Observer(PrometheusSource(options.prometheus_url, bearer_token_file=options.prometheus_token_file),
                        window)
    return Observer(PodScraper(), window)


def _peering_reader(writer: Writer, options: RunOptions):
    """Reads the peering objects kopf uses: the ClusterKopfPeering for a cluster-wide operator, the
    KopfPeering of each namespace for a namespaced one."""
    async def read() -> list[dict | None]:
        if not options.namespaces:
            return [await writer.get("kopf.dev/v1", "ClusterKopfPeering", None, options.peering)]
        return [await writer.get("kopf.dev/v1", "KopfPeering", ns, options.peering) for ns in options.namespaces]
    return read


async def run_async(options: RunOptions, *, stop_flag: asyncio.Event | threading.Event | None = None,
                    ready_flag: asyncio.Event | threading.Event | None = None,
                    state_holder: list | None = None) -> None:
    registry, state = build(options)
    if state_holder is not None:
        state_holder.append(state)
    server = None
    if options.metrics_port is not None:
        server = state.metrics.serve(options.metrics_port, host=options.metrics_host)
    liveness = f"http://{_url_host(options.health_host)}:{options.health_port}/healthz" if options.health_port else None
    try:
        await kopf.operator(
            registry=registry,
            memo=kopf.Memo(state=state, watch_timeout=options.watch_timeout),
            clusterwide=not options.namespaces,
            namespaces=options.namespaces,
            standalone=options.peering is None,
            peering_name=options.peering,
            identity=state.peering.identity if state.peering is not None else None,
            liveness_endpoint=liveness,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        state.writer.close()
        if server is not None:
            server.shutdown()
            server.server_close()


def _url_host(host: str) -> str:
    """A listen address as a URL spells it: IPv6 in brackets."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host.strip("[]")).version == 6 else host
    except ValueError:
        return host


# --- Pods of every namespace, for a namespaced operator ---------------------------------------------------

#: Pods per page of the initial listing.
LIST_PAGE = 500


class ClusterPods:
    """The Pods of every namespace, for an operator that watches only some namespaces.

    kopf watches namespaced kinds in the watched namespaces only, Pods included, so the GPUs and memory
    that pods of other namespaces hold would look free to the planner (a plan would then wait in Pending
    for them). This lists the Pods of all namespaces before the first pass, then watches them, with the
    official client in a thread of its own; every change goes through OperatorState.pod_seen on the
    operator's loop, as kopf's pod events do. It reads like kopf's pod index
    ({(namespace, pod): [(PodUsage, owning LlamaDeployment)]}), which it replaces in state.indexes.
    Only pods that take something from their node are kept (state.pod_use).
    """

    def __init__(self, cfg: kubernetes.client.Configuration, state: OperatorState, watch_timeout: int = 300):
        self.cfg = cfg
        self.state = state
        self.watch_timeout = max(10, int(watch_timeout))
        self._index: dict[Key, list[PodUse]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._api: kubernetes.client.ApiClient | None = None
        self.active = False  # listing succeeded: the index covers every namespace

    # kopf.Index's reading side, as OperatorState.inventory_for uses it (read on the loop only).
    def items(self):
        return self._index.items()

    def __len__(self) -> int:
        return len(self._index)

    def _core(self) -> kubernetes.client.CoreV1Api:
        if self._api is None:
            self._api = kubernetes.client.ApiClient(self.cfg)
            self._api.user_agent = "llama-operator"
        return kubernetes.client.CoreV1Api(self._api)

    def _list(self) -> tuple[dict[Key, list[PodUse]], str]:
        """Every Pod that takes something from its node, and the list's resourceVersion (blocking)."""
        core, index, token = self._core(), {}, None
        while True:
            kwargs: dict[str, Any] = {"limit": LIST_PAGE, "_preload_content": False, "_request_timeout": (5, 60)}
            if token:
                kwargs["_continue"] = token
            page = json.loads(core.list_pod_for_all_namespaces(**kwargs).data)
            for pod in page.get("items") or []:
                key, use = _pod_entry(pod)
                if use is not None:
                    index[key] = [use]
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return index, (page.get("metadata") or {}).get("resourceVersion") or ""

    async def start(self) -> bool:
        """List every namespace's Pods and take over the pod index; False (and a warning) when the operator
        may not list Pods cluster-wide, which leaves it to the watched namespaces' Pods."""
        self._loop = asyncio.get_running_loop()
        try:
            index, version = await self._loop.run_in_executor(None, self._list)
        except kubernetes.client.ApiException as e:
            if e.status in (401, 403):
                log.warning("--pods-all-namespaces: may not list Pods cluster-wide (%s %s); planning sees only the "
                            "watched namespaces' Pods. Grant list and watch on pods in a ClusterRole to count the "
                            "GPUs other namespaces' pods hold.", e.status, e.reason)
                return False
            raise  # kopf retries the startup handler
        self._replace(index)
        assert self.state.indexes is not None, "the configure startup handler runs first"
        self.state.indexes = dataclasses.replace(self.state.indexes, pods=self)
        self.active = True
        self._thread = threading.Thread(target=self._watch, args=(version,), name="cluster-pods", daemon=True)
        self._thread.start()
        log.info("reading the Pods of every namespace (%d holding resources)", len(self._index))
        return True

    def stop(self) -> None:
        self._stop.set()

    # --- on the loop ---

    def _set(self, key: Key, use: PodUse | None) -> None:
        if use is None:
            self._index.pop(key, None)
        else:
            self._index[key] = [use]
        self.state.pod_seen(key, use)

    def _replace(self, index: dict[Key, list[PodUse]]) -> None:
        for key in [k for k in self._index if k not in index]:
            self._set(key, None)
        for key, (use,) in index.items():
            if self._index.get(key) != [use]:
                self._set(key, use)

    # --- in the thread ---

    def _post(self, fn, *args) -> bool:
        if self._stop.is_set() or self._loop is None or self._loop.is_closed():
            return False
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed in between
            return False
        return True

    def _watch(self, version: str) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                if not version:  # (re)list: the watch fell too far behind, or a stream broke off
                    index, version = self._list()
                    if not self._post(self._replace, index):
                        return
                version = self._stream(version)
                backoff = 1.0
            except kubernetes.client.ApiException as e:
                if e.status == 410:  # Gone: relist from now
                    version = ""
                    continue
                log.warning("watching the Pods of every namespace: %s %s; retrying in %gs", e.status, e.reason, backoff)
                version = ""
            except Exception as e:  # noqa: BLE001 - connection trouble: relist after a pause
                if self._stop.is_set():
                    return
                log.warning("watching the Pods of every namespace: %s; retrying in %gs", e, backoff)
                version = ""
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 30.0)

    def _stream(self, version: str) -> str:
        """Follow the watch from `version` until the server ends it; the version to go on from ('' to relist)."""
        watch = kubernetes.watch.Watch()
        for event in watch.stream(self._core().list_pod_for_all_namespaces, resource_version=version,
                                  allow_watch_bookmarks=True, timeout_seconds=self.watch_timeout,
                                  _request_timeout=(5, self.watch_timeout + 30)):
            if self._stop.is_set():
                watch.stop()
                break
            kind, obj = event.get("type"), event.get("raw_object") or {}
            if kind == "ERROR":
                return "" if obj.get("code") == 410 else version
            version = (obj.get("metadata") or {}).get("resourceVersion") or version
            if kind == "BOOKMARK":
                continue
            key, use = _pod_entry(obj)
            if not self._post(self._set, key, None if kind == "DELETED" else use):
                break
        return version


def _pod_entry(pod: dict) -> tuple[Key, PodUse | None]:
    meta = pod.get("metadata") or {}
    return (meta.get("namespace", ""), meta.get("name", "")), pod_use(pod, meta.get("labels") or {})


def _register_cluster_pods(registry: kopf.OperatorRegistry, pods: ClusterPods) -> None:
    """Startup (after the project's own `configure`, which kopf runs first: registration order) and cleanup
    handlers that run ClusterPods."""

    @kopf.on.startup(id="cluster_pods", registry=registry)
    async def cluster_pods(**_):
        await pods.start()

    @kopf.on.cleanup(id="stop_cluster_pods", registry=registry)
    async def stop_cluster_pods(**_):
        pods.stop()
