"""The sandbox's simulated model servers (sandbox/engines.py) as the SLO loop sees them: a running pod gets
a loopback podIP and Ready, and answers /metrics there in its engine release's own format, with the
catalog's series names; the numbers follow the LlamaDeployment's plan and the sandbox annotations; the
servers go with their pods and with the kubelet.

The LlamaDeployments here carry a status.plan written by the test (no operator runs: the numbers are the
test's own), and a Deployment shaped as the renderer shapes one, which the SimulatedKubelet runs.
"""
from __future__ import annotations

import errno
import math
import re
import socket
import time
import urllib.error
import urllib.request

import pytest

from llama_operator.api import API_VERSION, KIND
from llama_operator.engines import release
from llama_operator.metrics import VLLM_TPOT_BUCKETS, VLLM_TTFT_BUCKETS
from llama_operator.ownership import LABEL_DEPLOYMENT, LABEL_RUNTIME, MANAGED_BY, PORTS
from llama_operator.drafting import acceptance_rate
from llama_operator.sandbox.engines import (DRAFT_ACCEPTANCE, HIGH, LATENCY_FACTOR, LOAD_FACTOR, LOW, OUTPUT_TOKENS,
                                            traffic)
from llama_operator.sandbox.kubelet import SimulatedKubelet

from kit.cluster import Cluster
from kit.examples import example
from kit.nodes import node_manifest
from kit.operator import fast_settings
from kit.poll import wait_until

pytestmark = pytest.mark.looptime(False)

#: Seconds between the two scrapes whose difference the checks read.
WINDOW = 3.0


@pytest.fixture
def cluster(llama_cluster: Cluster) -> Cluster:
    llama_cluster.add_nodes([node_manifest("worker", cpu="64", memory="256Gi")])
    return llama_cluster


def _llama(cluster: Cluster, name: str, *, concurrency: int, annotations: dict[str, str],
           predicted: dict | None, engine: str, speculative: dict | None = None) -> None:
    """A LlamaDeployment with `predicted` as its plan's prediction (none: no plan in status), and `speculative`
    as its plan's draft."""
    body = {"apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"model": "llama-3.1-8b-instruct", "memoryBudget": "40Gi", "replicas": 1,
                     "slo": {"ttftP95": "2s", "tpotP95": "100ms", "promptTokens": 1024,
                             "concurrency": concurrency}}}
    cluster.llamas.create(body=body, namespace="default")
    if predicted is not None:
        rel = release(engine)
        plan = {"model": "llama-3.1-8b-instruct", "quantization": "bf16" if rel.engine == "vllm" else "q8_0",
                "runtime": rel.engine, "engine": engine, "gpusPerReplica": 1, "predicted": predicted,
                **({"speculative": speculative} if speculative else {})}
        cluster.llamas.status.patch(name=name, namespace="default", body={"status": {"plan": plan}},
                                    content_type="application/merge-patch+json")


def _deployment(cluster: Cluster, name: str, engine: str, args: tuple[str, ...] = ()) -> None:
    """The Deployment of LlamaDeployment `name` as the renderer labels it, running `engine`'s image (with
    `args` besides the served name)."""
    rel = release(engine)
    labels = {**MANAGED_BY, LABEL_DEPLOYMENT: name, LABEL_RUNTIME: rel.engine}
    flag = "--served-model-name" if rel.engine == "vllm" else "--alias"
    container = {"name": "server", "image": next(iter(rel.images.values())), "args": [flag, name, *args],
                 "ports": [{"name": "http", "containerPort": PORTS[rel.engine]}],
                 "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}
    cluster.resource("apps/v1", "Deployment").create(namespace="default", body={
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}}}})


def _serving_pod(cluster: Cluster, name: str) -> dict:
    def ready() -> dict | None:
        for p in cluster.managed_pods(name):
            st = p.get("status") or {}
            if st.get("podIP") and any(c["type"] == "Ready" and c["status"] == "True"
                                       for c in st.get("conditions") or []):
                return p
        return None
    return wait_until(ready, 15, f"a Ready pod of {name} with a podIP")


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.headers["Content-Type"], r.read().decode()


def _gone(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except (urllib.error.URLError, ConnectionError):
        return True
    return False


def _samples(text: str) -> dict[str, float]:
    """Every sample by its name and labels as printed, e.g. 'vllm:x_bucket{engine="0",le="0.5",...}'."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def _families(text: str) -> dict[str, str]:
    """Each family's TYPE."""
    return {m[1]: m[2] for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M)}


def _buckets(samples: dict[str, float], name: str) -> list[tuple[float, float]]:
    """The histogram's cumulative buckets, (le, count), +Inf last."""
    pattern = re.compile(rf'{re.escape(name)}_bucket\{{.*le="([^"]+)"')
    return sorted((float(m[1]), v) for k, v in samples.items() if (m := pattern.match(k)))


def _p95(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> float:
    """histogram_quantile(0.95, increase(...)) as Prometheus computes it: linear within the bucket, the
    first bucket starting at 0."""
    counts = [(le, a - b) for (le, a), (_, b) in zip(after, before)]
    rank = 0.95 * counts[-1][1]
    lower, below = 0.0, 0.0
    for le, n in counts:
        if n >= rank:
            return lower + (le - lower) * (rank - below) / (n - below)
        lower, below = le, n
    raise AssertionError("no bucket holds the rank")


def _bucket_of(q: float, bounds: tuple[float, ...]) -> tuple[float, float]:
    upper = next(b for b in bounds if b >= q)
    return max([0.0, *[b for b in bounds if b < q]]), upper


def test_a_vllm_pod_serves_its_releases_histograms_at_the_plans_latency_times_the_factor(cluster, kubelet):
    rel = release("vllm-0.34.0")
    # The plan's prediction includes a learned correction of 1.5; the engine runs at the estimate (1/1.5 of
    # it) times the latency factor 2, under three times the load one replica was planned for.
    predicted = {"memoryBytes": 1, "ttftSeconds": 0.6, "tpotSeconds": 0.045,
                 "correctedBy": {"ttftFactor": 1.5, "tpotFactor": 1.5}}
    ttft, tpot, concurrency = 0.6 / 1.5 * 2, 0.045 / 1.5 * 2, 128
    _llama(cluster, "chat", concurrency=concurrency, annotations={LATENCY_FACTOR: "2", LOAD_FACTOR: "3"},
           predicted=predicted, engine=rel.id)
    _deployment(cluster, "chat", rel.id)
    pod = _serving_pod(cluster, "chat")
    ip = pod["status"]["podIP"]
    assert re.fullmatch(r"127\.0\.\d+\.\d+", ip) and ip != "127.0.0.1", ip
    assert pod["status"]["podIPs"] == [{"ip": ip}]
    assert all(c["ready"] for c in pod["status"]["containerStatuses"])
    base = f"http://{ip}:{PORTS['vllm']}"
    assert _get(f"{base}/health")[0] == 200

    status, content_type, first = _get(f"{base}/metrics")
    assert status == 200 and content_type == "text/plain; version=0.0.4"
    signals = rel.slo_signals
    # the release's series, as the catalog names them; the draft's only with a draft (vLLM creates them then)
    assert set(_families(first)) == rel.metrics - {signals.draft_tokens, signals.draft_accepted}
    assert _families(first)[signals.ttft] == _families(first)[signals.tpot] == "histogram"
    assert _families(first)[signals.generated_tokens] == "counter"
    assert _families(first)[signals.running] == _families(first)[signals.waiting] == "gauge"
    assert f'{signals.ttft}_bucket{{engine="0",le="2560.0",model_name="chat"}}' in _samples(first)
    time.sleep(WINDOW)
    second = _samples(_get(f"{base}/metrics")[2])
    first_samples = _samples(first)

    labels = '{engine="0",model_name="chat"}'
    assert second[signals.generated_tokens + labels] > first_samples[signals.generated_tokens + labels]
    assert second[signals.running + labels] == concurrency
    assert second[signals.waiting + labels] == 2 * concurrency
    requests = second[f"{signals.ttft}_count{labels}"] - first_samples[f"{signals.ttft}_count{labels}"]
    rate = concurrency / (ttft + tpot * OUTPUT_TOKENS)
    assert abs(requests - rate * WINDOW) <= 0.25 * rate * WINDOW + 2, (requests, rate)
    for name, q, bounds in ((signals.ttft, ttft, VLLM_TTFT_BUCKETS), (signals.tpot, tpot, VLLM_TPOT_BUCKETS)):
        p95 = _p95(_buckets(first_samples, name), _buckets(second, name))
        lower, upper = _bucket_of(q, bounds)
        assert lower < p95 <= upper, f"{name}: p95 {p95} outside ({lower}, {upper}] around {q}"
        n = second[f"{name}_count{labels}"] - first_samples[f"{name}_count{labels}"]
        mean = (second[f"{name}_sum{labels}"] - first_samples[f"{name}_sum{labels}"]) / n
        assert mean == pytest.approx((LOW + HIGH) / 2 * q, rel=0.05), name
    # every counter only grows (floors of the accumulators)
    assert all(second[k] >= v for k, v in first_samples.items() if "_bucket" in k or "_count" in k)


def test_a_llamacpp_pod_prints_its_metrics_as_llama_server_does(cluster, kubelet):
    rel = release("llamacpp-b11434")
    predicted = {"memoryBytes": 1, "ttftSeconds": 0.8, "tpotSeconds": 0.02}
    concurrency = 64
    _llama(cluster, "edge", concurrency=concurrency, annotations={LOAD_FACTOR: "3"}, predicted=predicted,
           engine=rel.id)
    _deployment(cluster, "edge", rel.id)
    ip = _serving_pod(cluster, "edge")["status"]["podIP"]
    url = f"http://{ip}:{PORTS['llamacpp']}/metrics"
    status, content_type, text = _get(url)
    assert status == 200 and content_type == "text/plain; version=0.0.4"
    items = re.findall(r"# HELP (llamacpp:\w+) .+\n# TYPE \1 (counter|gauge)\n\1 (\S+)\n", text)
    assert len(text.splitlines()) == 3 * len(items), "HELP, TYPE and the value of each item, nothing else"
    assert "{" not in text, "llama-server's metrics carry no labels"
    assert rel.metrics <= {name for name, _, _ in items}
    signals = rel.slo_signals
    time.sleep(WINDOW)
    first, second = _samples(text), _samples(_get(url)[2])
    grew = {k: second[k] - first[k] for k in (signals.prompt_tokens, signals.prompt_seconds,
                                              signals.predicted_tokens, signals.predicted_seconds)}
    assert all(v > 0 for v in grew.values()), grew
    # the loop's means: prefill time per prompt token x promptTokens is the ttft; predicted time per token the tpot
    ttft = grew[signals.prompt_seconds] / grew[signals.prompt_tokens] * 1024
    tpot = grew[signals.predicted_seconds] / grew[signals.predicted_tokens]
    assert ttft == pytest.approx(0.8, rel=0.02) and tpot == pytest.approx(0.02, rel=0.02)
    assert second[signals.running] == concurrency and second[signals.waiting] == 2 * concurrency


def test_without_a_plan_the_counters_stay_zero(cluster, kubelet):
    rel = release("vllm-0.34.0")
    _llama(cluster, "unplanned", concurrency=4, annotations={}, predicted=None, engine=rel.id)
    _deployment(cluster, "unplanned", rel.id)
    ip = _serving_pod(cluster, "unplanned")["status"]["podIP"]
    time.sleep(1)
    samples = _samples(_get(f"http://{ip}:{PORTS['vllm']}/metrics")[2])
    assert samples and all(v == 0 for v in samples.values()), samples


def test_servers_go_with_their_pods_and_with_the_kubelet(cluster, kubeconfig):
    kubelet = SimulatedKubelet(str(kubeconfig), interval=0.2).start()
    try:
        rel = release("vllm-0.10.2")
        for name in ("one", "two"):
            _llama(cluster, name, concurrency=2, annotations={}, engine=rel.id,
                   predicted={"memoryBytes": 1, "ttftSeconds": 0.2, "tpotSeconds": 0.02})
            _deployment(cluster, name, rel.id)
        one, two = (_serving_pod(cluster, n)["status"]["podIP"] for n in ("one", "two"))
        assert one != two, "each pod its own address"
        text = _get(f"http://{one}:{PORTS['vllm']}/metrics")[2]
        assert set(_families(text)) == rel.metrics  # this release's names (time_per_output_token_seconds)
        cluster.resource("apps/v1", "Deployment").delete(name="one", namespace="default")
        wait_until(lambda: _gone(f"http://{one}:{PORTS['vllm']}/metrics"), 10, "one's server to stop")
        assert not _gone(f"http://{two}:{PORTS['vllm']}/health")
        # a new pod takes the freed address
        _deployment(cluster, "one", rel.id)
        assert _serving_pod(cluster, "one")["status"]["podIP"] == one
    finally:
        kubelet.stop()
    assert _gone(f"http://{one}:{PORTS['vllm']}/health") and _gone(f"http://{two}:{PORTS['vllm']}/health")


def test_the_operators_pod_serves_the_planned_release(cluster, run_operator, kubelet):
    """End to end: the pod of the operator's own Deployment serves the series of the release it planned."""
    cluster.add_nodes("mixed")
    run_operator(fast_settings())
    cluster.create(example("chat.yaml"))
    plan = cluster.wait_phase("chat", "Ready", timeout=30)["plan"]
    ip = _serving_pod(cluster, "chat")["status"]["podIP"]
    text = _get(f"http://{ip}:{PORTS[plan['runtime']]}/metrics")[2]
    signals = release(plan["engine"]).slo_signals
    drafting = set() if plan.get("speculative") or plan["runtime"] == "llamacpp" else \
        {signals.draft_tokens, signals.draft_accepted}
    assert set(_families(text)) >= release(plan["engine"]).metrics - drafting
    assert not math.isnan(sum(_samples(text).values()))


def test_a_pod_started_with_a_draft_counts_drafted_and_accepted_tokens(cluster, kubelet):
    """The pod's --speculative-config makes its engine draft; the plan's acceptance, or the annotation's."""
    rel = release("vllm-0.34.0")
    config = '{"method":"draft_model","model":"meta-llama/Llama-3.2-1B-Instruct","num_speculative_tokens":3}'
    for name, notes, rate in (("predicted", {}, acceptance_rate(0.78, 3)),
                              ("guessed-badly", {DRAFT_ACCEPTANCE: "0.2"}, 0.2)):
        _llama(cluster, name, concurrency=8, annotations=notes, engine=rel.id,
               predicted={"memoryBytes": 1, "ttftSeconds": 0.1, "tpotSeconds": 0.012},
               speculative={"draftModel": "llama-3.2-1b-instruct", "draftQuantization": "bf16",
                            "numSpeculativeTokens": 3, "acceptance": 0.78, "predictedSpeedup": 1.7})
        _deployment(cluster, name, rel.id, ("--speculative-config", config))
        url = f"http://{_serving_pod(cluster, name)['status']['podIP']}:{PORTS['vllm']}/metrics"
        first = _get(url)[2]
        assert set(_families(first)) == rel.metrics
        time.sleep(WINDOW)
        before, after = _samples(first), _samples(_get(url)[2])
        labels = f'{{engine="0",model_name="{name}"}}'
        drafted, accepted = (after[n + labels] - before[n + labels] for n in (rel.slo_signals.draft_tokens,
                                                                              rel.slo_signals.draft_accepted))
        assert drafted > 100 and accepted / drafted == pytest.approx(rate, abs=0.02), name


def test_traffic_reads_the_plan_without_its_correction_and_ignores_bad_factors():
    ld = {"metadata": {"annotations": {LATENCY_FACTOR: "fast", LOAD_FACTOR: "-2"}},
          "spec": {"replicas": 3, "slo": {"concurrency": 4}},
          "status": {"plan": {"predicted": {"ttftSeconds": 0.9, "tpotSeconds": 0.06,
                                            "correctedBy": {"ttftFactor": 3, "tpotFactor": 2}}}}}
    t = traffic(ld, serving_pods=2)
    assert (t.ttft, t.tpot) == pytest.approx((0.3, 0.03))
    assert (t.running, t.waiting) == (4, 2)  # 4 x 3 offered over 2 pods: 6 each, 4 run
    ld["metadata"]["annotations"] = {LATENCY_FACTOR: "1.5", LOAD_FACTOR: "0.5"}
    t = traffic(ld, serving_pods=3)
    assert (t.ttft, t.running, t.waiting) == pytest.approx((0.45, 2, 0))
    assert traffic({"metadata": {}, "spec": {}}, serving_pods=1).requests_per_second == 0


def test_an_address_another_server_holds_is_passed_over(cluster, kubelet):
    rel = release("vllm-0.34.0")
    with socket.socket() as squatter:  # as another sandbox on this machine would hold it
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past earlier tests' closed connections
        try:
            squatter.bind(("127.0.1.1", PORTS["vllm"]))
            squatter.listen()
        except OSError as e:  # another server on this machine holds it already: the case as it is
            if e.errno != errno.EADDRINUSE:
                raise
            socket.create_connection(("127.0.1.1", PORTS["vllm"]), timeout=2).close()
        _llama(cluster, "chat", concurrency=1, annotations={}, engine=rel.id,
               predicted={"memoryBytes": 1, "ttftSeconds": 0.2, "tpotSeconds": 0.02})
        _deployment(cluster, "chat", rel.id)
        ip = _serving_pod(cluster, "chat")["status"]["podIP"]
        assert ip != "127.0.1.1"
        assert _get(f"http://{ip}:{PORTS['vllm']}/health")[0] == 200
