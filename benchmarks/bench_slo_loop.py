"""SLO loop benchmark: what observing costs Prometheus as deployments grow, and how fast a breach is acted on.

    .venv/bin/python benchmarks/bench_slo_loop.py [--deployments 1,10,50,200] [--skip-breach]

Prints one JSON document on stdout. Not a test: timings depend on the machine and its load; compare
numbers taken in the same run.

* ``prometheus``: `PrometheusSource.collect` for N deployments (vLLM 0.34.0, vLLM 0.10.2 and llama.cpp in
  turn) against a stand-in for Prometheus's HTTP API on 127.0.0.1 that answers every query with the
  series of all N deployments (each bucket bound of each histogram, each gauge and counter), so the
  operator parses what a real server would send. Per N: queries per collect, queries per minute at
  the default 30 s interval, answer bytes, and the collect's wall time. The issue's goal: queries per
  minute flat in the number of deployments.
* ``breach_to_write``: the sandbox (API emulator, simulated kubelet and engines serving /metrics on
  127.0.0.x, the operator scraping the pods) with a 1 s interval and a 6 s window: one deployment is
  annotated `sandbox.llama-operator.dev/latency-factor: "4"` once it meets its SLO, and the time until
  the operator writes the correction into its status is measured, beside what the settings imply (the
  window of slow data needed to push the window's figure over the target, then the window the breach must
  last, plus an interval or two).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402

from llama_operator.metrics import VLLM_TPOT_BUCKETS, VLLM_TTFT_BUCKETS, format_le  # noqa: E402
from llama_operator.observe import Target  # noqa: E402
from llama_operator.observer import Observer, PrometheusSource  # noqa: E402

ENGINES = [("vllm", "vllm-0.34.0"), ("vllm", "vllm-0.10.2"), ("llamacpp", "llamacpp-b11434")]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the operator sends its queries at once; the default backlog of 5 drops some


class StandInPrometheus:
    """Answers /api/v1/query with one sample per deployment (per bucket bound for a bucket query)."""

    def __init__(self, deployments: int):
        self.deployments = deployments
        self.bytes_sent = 0
        bench = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                query = parse_qs(urlsplit(self.path).query)["query"][0]
                body = json.dumps(bench.answer(query)).encode()
                bench.bytes_sent += len(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, query: str) -> dict:
        now = time.time()
        bounds = VLLM_TTFT_BUCKETS if "time_to_first_token" in query else VLLM_TPOT_BUCKETS
        result = []
        for i in range(self.deployments):
            labels = {"namespace": "bench", "llamadeployment": f"d{i}"}
            if "_bucket" in query:
                for n, le in enumerate([*bounds, float("inf")]):
                    result.append({"metric": {**labels, "le": format_le(le)},
                                   "value": [now, str(min(1.0, 0.05 * (n + 1)))]})
            else:
                result.append({"metric": labels, "value": [now, "1"]})
        return {"status": "success", "data": {"resultType": "vector", "result": result}}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def bench_prometheus(sizes: list[int], interval_seconds: float = 30.0) -> list[dict]:
    out = []
    for n in sizes:
        stand_in = StandInPrometheus(n)
        try:
            source = PrometheusSource(stand_in.url, timeout=30)
            observer = Observer(source, window_seconds=300)
            targets = [Target("bench", f"d{i}", *ENGINES[i % len(ENGINES)], ttft_target_seconds=1.0,
                              tpot_target_seconds=0.05, prompt_tokens=512) for i in range(n)]
            times = []
            for _ in range(3):
                started = time.perf_counter()
                seen = asyncio.run(observer.collect(targets, {}))
                times.append(time.perf_counter() - started)
            problems = sum(1 for o in seen.values() if o.problem)
            per_collect = source.queries_sent // 3
            out.append({"deployments": n, "queries_per_collect": per_collect,
                        "queries_per_minute": round(per_collect * 60 / interval_seconds, 1),
                        "answer_bytes_per_collect": stand_in.bytes_sent // 3,
                        "collect_seconds_median": round(sorted(times)[1], 4), "observations_with_problems": problems})
        finally:
            stand_in.stop()
    return out


def bench_breach_to_write(timeout: float = 120.0) -> dict:
    """The sandbox, one deployment; seconds from the latency-factor annotation to the corrective status write."""
    from datetime import timedelta

    from llama_operator.api import API_VERSION, KIND
    from llama_operator.crd import crd_manifest
    from llama_operator.sandbox.demo import EXAMPLES, SandboxOperator, load_docs
    from llama_operator.sandbox.emulator import declare_crd
    from llama_operator.sandbox.kubelet import SimulatedKubelet, dynamic_client
    from llama_operator.sandbox.server import EmulatorThread
    from llama_operator.slo import SloSettings
    from llama_operator.state import Settings

    interval, window = 1.0, 6.0
    settings = Settings(resync_seconds=30, slo_interval_seconds=interval,
                        slo=SloSettings(window=timedelta(seconds=window), cooldown=timedelta(seconds=10),
                                        calm_window=timedelta(seconds=20), correction_ttl=timedelta(hours=1),
                                        min_samples=5))
    with EmulatorThread() as emu:
        declare_crd(emu.emulator, crd_manifest())
        kubeconfig = str(emu.write_kubeconfig(Path(tempfile.mkdtemp()) / "kubeconfig"))
        api = dynamic_client(kubeconfig)
        nodes = api.resources.get(api_version="v1", kind="Node")
        for n in load_docs(EXAMPLES / "clusters" / "slo-loop.yaml"):
            nodes.create(body={k: v for k, v in n.items() if k != "metadata"} | {
                "metadata": {k: v for k, v in n["metadata"].items() if k in ("name", "labels", "annotations")}})
        kubelet = SimulatedKubelet(kubeconfig).start()
        operator = SandboxOperator(kubeconfig, settings, slo_source="pods").start()
        lds = api.resources.get(api_version=API_VERSION, kind=KIND)
        try:
            # llama.cpp's slow-engine of examples/slo-loop.yaml, without its annotation until the clock starts
            # (its output tokens are plenty of samples in a 6 s window, also 4x slower).
            doc = next(d for d in load_docs(EXAMPLES / "slo-loop.yaml") if d["metadata"]["name"] == "slow-engine")
            doc["metadata"].pop("annotations", None)
            lds.create(body=doc, namespace="default")
            name = doc["metadata"]["name"]

            def status() -> dict:
                return lds.get(name=name, namespace="default").to_dict().get("status") or {}

            met = _wait(lambda: any(c["type"] == "SLOMet" and c["status"] == "True"
                                    for c in status().get("conditions") or []), timeout)
            if not met:
                return {"error": f"{name} never met its SLO in {timeout:g}s", "status": status()}
            started = time.monotonic()
            lds.patch(name=name, namespace="default", content_type="application/merge-patch+json",
                      body={"metadata": {"annotations": {"sandbox.llama-operator.dev/latency-factor": "4"}}})
            corrected = _wait(lambda: bool(status().get("corrections")), timeout)
            took = time.monotonic() - started
            return {"deployment": "slow-engine (examples/slo-loop.yaml): llama.cpp f16 on 1x L4", "interval_seconds":
                    interval, "window_seconds": window,
                    "bounds_seconds": f"at least {window:g} (the breach must last the window) and at most "
                                      f"{2 * window + 3 * interval:g} (slow data filling the window first, and "
                                      "an interval each to scrape, judge and write)",
                    "breach_to_corrective_write_seconds": round(took, 2) if corrected else None,
                    "correction": (status().get("corrections") or [None])[0]}
        finally:
            operator.stop()
            kubelet.stop()


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deployments", default="1,10,50,200")
    ap.add_argument("--skip-breach", action="store_true", help="only the Prometheus part")
    args = ap.parse_args()
    sizes = [int(s) for s in args.deployments.split(",")]
    doc = report.header("slo_loop")
    doc["prometheus"] = bench_prometheus(sizes)
    # Flat once every engine release is among the deployments (each release adds its own signals).
    per_minute = {row["queries_per_minute"] for row in doc["prometheus"] if row["deployments"] >= len(ENGINES)}
    doc["queries_per_minute_flat_from_3_deployments"] = len(per_minute) == 1
    if not args.skip_breach:
        doc["breach_to_write"] = bench_breach_to_write()
    return report.emit(doc)


if __name__ == "__main__":
    sys.exit(main())
