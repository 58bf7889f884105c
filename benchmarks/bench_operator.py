"""Operator benchmark: llama-operator against a bare kopf operator making the same writes, same run.

    .venv/bin/python benchmarks/bench_operator.py [--deployments 200] [--nodes 500] [--rounds 1]
        [--only ours|bare] [--timeout 150] [--cprofile-dir DIR] [--py-spy-dir DIR]

For each operator (bare first, then llama-operator; with --rounds N they alternate order each round):

1. a fresh API emulator (llama_operator.sandbox.emulator, kmock-based) in this process on 127.0.0.1, with the
   LlamaDeployment CRD and `--nodes` synthetic Nodes (20 shapes, benchmarks/synthetic.py);
2. the operator in its own subprocess (benchmarks/run_operator.py: what `llama-operator run
   --standalone -A` runs; benchmarks/bare_operator.py: the floor), waited for until its liveness
   endpoint answers and it watches LlamaDeployments;
3. `--deployments` LlamaDeployments (a varied mix) created through the API, one after another;
4. timestamps come from the emulator itself (a hook on its event log, no polling): when each
   LlamaDeployment was stored, when its Deployment was created, when its status first had a phase;
5. converged: every LlamaDeployment has status.phase and (unless Unschedulable/Invalid) a Deployment;
   settled: the last write to a LlamaDeployment, Deployment or Service before `--quiet` seconds of
   silence (a deployment may write again after its first pass, e.g. when a plan it waits for moves);
6. peak RSS of the operator process: VmHWM from /proc/<pid>/status, read just before stopping it.

Prints one JSON document: both results, ours/floor ratios, and the goal verdicts (time to converge
within 1.25x of the floor; RSS under 200 MiB). Not a test: the numbers move with machine load, so only
compare numbers from the same run.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
import synthetic  # noqa: E402

from llama_operator.crd import crd_manifest  # noqa: E402
from llama_operator.sandbox.demo import wait_for  # noqa: E402
from llama_operator.sandbox.emulator import ClusterEmulator, declare_crd  # noqa: E402
from llama_operator.sandbox.server import EmulatorThread  # noqa: E402

GOAL_RATIO = 1.25
GOAL_RSS_MIB = 200.0


class TimedEmulator(ClusterEmulator):
    """The emulator, recording when the objects the benchmark follows are written, and the requests."""

    def _emit(self, resource, type_: str, obj: dict[str, Any]) -> None:
        super()._emit(resource, type_, obj)
        rec: Recorder | None = getattr(self, "recorder", None)
        if rec is not None:
            rec.event(resource.plural, type_, obj)

    async def __call__(self, raw_request):
        rec: Recorder | None = getattr(self, "recorder", None)
        if rec is not None:
            rec.request(raw_request.method, raw_request.path, raw_request.query_string)
        return await super().__call__(raw_request)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._requests = _RequestLogForMatching()


class _RequestLogForMatching(list):
    """kmock's request log, as its matching reads it.

    kmock keeps every request for test assertions, and matches each new request against its reactions
    by scanning that log (`request in payload._source`, criteria evaluated on every entry, one scan per
    reaction tried): quadratic as requests accumulate, ~0.1 s per request after a few thousand, and,
    when only finished requests are dropped, still proportional to the watch streams open (each stays in
    the log while it streams), so every request cost more with an operator that watches more kinds. A
    real API server's cost per request does not grow with either. The benchmark asserts nothing on the
    log, so it shows the matching only the request being matched: the one the current task is handling
    (kmock matches a request in the task that handles it). Request ids still count every request."""

    def __init__(self) -> None:
        super().__init__()
        self._handled = 0
        self._by_task: dict[asyncio.Task, Any] = {}

    def append(self, request: Any) -> None:
        self._handled += 1
        task = asyncio.current_task()
        self._by_task = {t: r for t, r in self._by_task.items() if not t.done()}
        self._by_task[task] = request

    def __len__(self) -> int:
        return self._handled

    def __iter__(self):
        request = self._by_task.get(asyncio.current_task())
        return iter([] if request is None else [request])


class Recorder:
    WATCHED = {"llamadeployments", "deployments", "services"}

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.created: dict[tuple[str, str], float] = {}
        self.deployment: dict[tuple[str, str], float] = {}
        self.phase: dict[tuple[str, str], tuple[float, str]] = {}
        self.last_phase: dict[tuple[str, str], str] = {}
        self.writes: dict[str, int] = {}
        self.last_write = 0.0
        self.requests: dict[str, int] = {}
        self.ld_watchers = 0

    def event(self, plural: str, type_: str, obj: dict) -> None:
        if plural not in self.WATCHED:
            return
        now = time.monotonic()
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        with self.lock:
            self.writes[f"{plural} {type_}"] = self.writes.get(f"{plural} {type_}", 0) + 1
            self.last_write = now
            if plural == "llamadeployments":
                if type_ == "ADDED":
                    self.created.setdefault(key, now)
                phase = (obj.get("status") or {}).get("phase")
                if phase:
                    self.phase.setdefault(key, (now, phase))
                    self.last_phase[key] = phase
            elif plural == "deployments" and type_ == "ADDED":
                self.deployment.setdefault(key, now)

    def request(self, method: str, path: str, query: str) -> None:
        parts = [p for p in path.split("/") if p]
        known = {"llamadeployments", "deployments", "services", "nodes", "pods", "events", "namespaces",
                 "persistentvolumeclaims", "customresourcedefinitions"}
        plural = next((p for p in reversed(parts) if p in known), "/" + "/".join(parts[:2]))
        watch = "watch=true" in query or "watch=1" in query
        if plural == "llamadeployments" and watch:
            self.ld_watchers += 1
        sub = "/status" if parts and parts[-1] == "status" else ""
        key = f"{method} {plural}{sub}{' watch' if watch else ''}"
        with self.lock:
            self.requests[key] = self.requests.get(key, 0) + 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(kubeconfig: str):
    from kubernetes import config, dynamic

    return dynamic.DynamicClient(config.new_client_from_config(config_file=kubeconfig))


def _vm(pid: int) -> dict[str, float]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":", 1)
                out[key + ":"] = round(int(value.split()[0]) / 1024, 1)  # kB -> MiB
    except OSError:
        pass
    return out


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001
        return False


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def run_one(which: str, n_nodes: int, n_deployments: int, timeout: float, quiet: float, workdir: Path,
            cprofile_dir: Path | None = None, py_spy_dir: Path | None = None) -> dict:
    rec = Recorder()

    def factory() -> TimedEmulator:
        emu = TimedEmulator()
        emu.recorder = rec
        return emu

    result: dict[str, Any] = {"operator": which}
    with EmulatorThread(emulator_factory=factory) as emu:
        declare_crd(emu.emulator, crd_manifest())
        kubeconfig = str(emu.write_kubeconfig(workdir / f"kubeconfig-{which}"))
        api = _client(kubeconfig)
        node_res = api.resources.get(api_version="v1", kind="Node")
        nodes, _ = synthetic.cluster(n_nodes)
        t0 = time.monotonic()
        for node in nodes:
            node_res.create(body=node)
        result["nodes_loaded_seconds"] = round(time.monotonic() - t0, 2)

        health = _free_port()
        script = HERE / ("bare_operator.py" if which == "bare" else "run_operator.py")
        cmd = [sys.executable, str(script), "--kubeconfig", kubeconfig, "--health-port", str(health)]
        if cprofile_dir is not None:
            cmd += ["--cprofile", str(cprofile_dir / f"{which}.prof")]
        log_path = workdir / f"{which}.log"
        env = {**os.environ, "KUBECONFIG": kubeconfig}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        started = time.monotonic()
        spy = None
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(HERE.parent))
        try:
            ready = wait_for(lambda: proc.poll() is None and _healthy(health) and rec.ld_watchers > 0, 60, 0.1)
            if not ready:
                raise RuntimeError(f"{which} operator did not start; see {log_path}")
            time.sleep(1.0)  # let the initial listings finish (llama-operator's indexes)
            result["startup_seconds"] = round(time.monotonic() - started, 2)
            result["rss_idle_mib"] = _vm(proc.pid).get("VmRSS:")
            spy = None
            if py_spy_dir is not None:  # sample whichever thread of the child holds the GIL (= its CPU)
                spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(proc.pid),
                                        "--format", "raw", "--gil", "--rate", "200", "--duration", str(int(timeout)),
                                        "--output", str(py_spy_dir / f"{which}.txt")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cpu_before = _cpu_seconds(proc.pid)

            ld_res = api.resources.get(api_version="llama-operator.dev/v1alpha1", kind="LlamaDeployment")
            items = synthetic.operator_specs(n_deployments)
            first = time.monotonic()
            for ns, name, spec in items:
                ld_res.create(namespace=ns, body={"apiVersion": "llama-operator.dev/v1alpha1",
                                                  "kind": "LlamaDeployment",
                                                  "metadata": {"name": name, "namespace": ns}, "spec": spec})
            result["create_seconds"] = round(time.monotonic() - first, 2)
            keys = [(ns, name) for ns, name, _ in items]

            def converged() -> bool:
                with rec.lock:
                    for k in keys:
                        if k not in rec.phase:
                            return False
                        if k not in rec.deployment and rec.last_phase.get(k) not in ("Unschedulable", "Invalid"):
                            return False
                return True

            deadline = first + timeout
            ok = wait_for(converged, max(0.0, deadline - time.monotonic()), 0.05)
            converged_at = time.monotonic() if ok else None
            with rec.lock:
                if ok:  # the real moment: the latest phase / Deployment among all
                    moments = [rec.phase[k][0] for k in keys] + [rec.deployment[k] for k in keys
                                                                 if k in rec.deployment]
                    converged_at = max(moments)

            def is_quiet() -> bool:
                return time.monotonic() - rec.last_write >= quiet

            settled = wait_for(is_quiet, max(0.0, deadline - time.monotonic()), 0.1)
            cpu_after = _cpu_seconds(proc.pid)
            vm = _vm(proc.pid)
            with rec.lock:
                to_dep = [rec.deployment[k] - rec.created[k] for k in keys if k in rec.deployment and k in rec.created]
                to_phase = [rec.phase[k][0] - rec.created[k] for k in keys if k in rec.phase and k in rec.created]
                phases: dict[str, int] = {}
                for k in keys:
                    p = rec.last_phase.get(k, "(none)")
                    phases[p] = phases.get(p, 0) + 1
                result.update({
                    "converged": ok,
                    "converge_seconds": round(converged_at - first, 3) if converged_at else None,
                    "settled": settled,
                    "settle_seconds": round(rec.last_write - first, 3) if settled else None,
                    "deployments_created": len(rec.deployment),
                    "create_to_deployment": {
                        "p50_ms": round(_pct(to_dep, 0.5) * 1e3, 1) if to_dep else None,
                        "p99_ms": round(_pct(to_dep, 0.99) * 1e3, 1) if to_dep else None,
                        "max_ms": round(max(to_dep) * 1e3, 1) if to_dep else None,
                    },
                    "create_to_phase": {
                        "p50_ms": round(_pct(to_phase, 0.5) * 1e3, 1) if to_phase else None,
                        "p99_ms": round(_pct(to_phase, 0.99) * 1e3, 1) if to_phase else None,
                    },
                    "phases": phases,
                    "operator_cpu_seconds": round(cpu_after - cpu_before, 2)
                    if cpu_after is not None and cpu_before is not None else None,
                    "rss_peak_mib": vm.get("VmHWM:"),
                    "rss_end_mib": vm.get("VmRSS:"),
                    "writes": dict(sorted(rec.writes.items())),
                    "requests": dict(sorted(rec.requests.items())),
                })
        finally:
            if spy is not None and spy.poll() is None:
                spy.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            result["log"] = str(log_path)
    return result


def _ratio(a, b):
    return round(a / b, 2) if a is not None and b else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--deployments", type=int, default=200)
    ap.add_argument("--nodes", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--only", choices=["bare", "ours"], help="run only this operator")
    ap.add_argument("--timeout", type=float, default=150.0, help="per operator run, from the first create")
    ap.add_argument("--quiet", type=float, default=3.0, help="seconds without writes that count as settled")
    ap.add_argument("--cprofile-dir", help="profile each operator's main thread (cProfile) into this directory")
    ap.add_argument("--py-spy-dir", help="sample each operator with py-spy (raw format) into this directory")
    args = ap.parse_args(argv)
    import logging

    logging.getLogger("kopf").setLevel(logging.ERROR)
    workdir = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    cprofile_dir = Path(args.cprofile_dir) if args.cprofile_dir else None
    py_spy_dir = Path(args.py_spy_dir) if args.py_spy_dir else None
    for d in (cprofile_dir, py_spy_dir):
        if d:
            d.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    variants = ["bare", "ours"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        if args.only:
            order = [args.only]
        for which in order:
            runs[which].append(run_one(which, args.nodes, args.deployments, args.timeout, args.quiet, workdir,
                                       cprofile_dir, py_spy_dir))

    def med(which: str, path: tuple[str, ...]):
        vals = []
        for run in runs[which]:
            v: Any = run
            for p in path:
                v = (v or {}).get(p)
            if v is not None:
                vals.append(v)
        return round(statistics.median(vals), 3) if vals else None

    summary = {}
    for which in variants:
        if runs[which]:
            summary[which] = {
                "converge_seconds": med(which, ("converge_seconds",)),
                "settle_seconds": med(which, ("settle_seconds",)),
                "create_to_deployment_p50_ms": med(which, ("create_to_deployment", "p50_ms")),
                "create_to_deployment_p99_ms": med(which, ("create_to_deployment", "p99_ms")),
                "rss_peak_mib": med(which, ("rss_peak_mib",)),
                "operator_cpu_seconds": med(which, ("operator_cpu_seconds",)),
            }
    out: dict[str, Any] = {
        **report.header("operator"),
        "nodes": args.nodes,
        "deployments": args.deployments,
        "rounds": args.rounds,
        "summary": summary,
        "runs": runs,
    }
    if "bare" in summary and "ours" in summary:
        o, b = summary["ours"], summary["bare"]
        ratios = {k: _ratio(o[k], b[k]) for k in o}
        out["ratios_ours_over_bare"] = ratios
        out["verdicts"] = {
            "converge_within_1.25x_of_floor": {"pass": ratios["converge_seconds"] is not None
                                               and ratios["converge_seconds"] <= GOAL_RATIO,
                                               "ratio": ratios["converge_seconds"], "goal": GOAL_RATIO},
            "create_to_deployment_p50_within_1.25x": {"pass": ratios["create_to_deployment_p50_ms"] is not None
                                                      and ratios["create_to_deployment_p50_ms"] <= GOAL_RATIO,
                                                      "ratio": ratios["create_to_deployment_p50_ms"]},
            "create_to_deployment_p99_within_1.25x": {"pass": ratios["create_to_deployment_p99_ms"] is not None
                                                      and ratios["create_to_deployment_p99_ms"] <= GOAL_RATIO,
                                                      "ratio": ratios["create_to_deployment_p99_ms"]},
            "rss_under_200MiB": {"pass": o["rss_peak_mib"] is not None and o["rss_peak_mib"] < GOAL_RSS_MIB,
                                 "rss_peak_mib": o["rss_peak_mib"], "goal_mib": GOAL_RSS_MIB},
        }
    out["wall_seconds"] = round(time.monotonic() - started, 1)
    return report.emit(out)


if __name__ == "__main__":
    sys.exit(main())
