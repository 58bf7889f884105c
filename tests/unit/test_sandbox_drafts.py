"""The sandbox's simulated engines with a draft model (sandbox/engines.py): the drafted and accepted tokens a pod
started with a draft counts, in its release's names and format, at the plan's predicted acceptance or the
draft-acceptance annotation's, read back as the SLO loop reads them (observe.py). The clock is the test's: no
server runs here (tests/integration/test_sandbox_engines.py serves them from pods)."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from llama_operator import planner
from llama_operator.api import parse_spec
from llama_operator.drafting import acceptance_rate, tokens_per_pass
from llama_operator.engines import release
from llama_operator.observe import Target, observation, parse_exposition, rates_between, relevant
from llama_operator.render import Owner, render
from llama_operator.sandbox import engines as sim
from llama_operator.sandbox.engines import DRAFT_ACCEPTANCE, OUTPUT_TOKENS, SimulatedEngine, traffic
from llama_operator.sandbox.demo import load_docs
from llama_operator.sandbox.kubelet import LLAMACPP_DEFAULT_DRAFT_MAX, draft_length

from kit.paths import CLUSTERS, EXAMPLES

VLLM, LLAMACPP = "vllm-0.34.0", "llamacpp-b11434"
#: Seconds the test's clock moves between two scrapes.
WINDOW = 60.0


@pytest.fixture
def clock(monkeypatch):
    """The engines' monotonic clock, moved by the test."""
    now = SimpleNamespace(t=1000.0)
    monkeypatch.setattr(sim, "time", SimpleNamespace(monotonic=lambda: now.t))
    return now


def _llama(engine: str, *, alpha: float | None, k: int = 3, annotations: dict | None = None) -> dict:
    """A LlamaDeployment as the API returns it, its plan decoding with a draft of `k` tokens at per-token
    acceptance `alpha` (None: no draft in the plan)."""
    rel = release(engine)
    plan = {"model": "llama-3.1-8b-instruct", "quantization": "bf16" if rel.engine == "vllm" else "q8_0",
            "runtime": rel.engine, "engine": engine, "gpusPerReplica": 1,
            "predicted": {"memoryBytes": 1, "ttftSeconds": 0.1, "tpotSeconds": 0.012}}
    if alpha is not None:
        plan["speculative"] = {"draftModel": "llama-3.2-1b-instruct", "draftQuantization": "bf16",
                               "numSpeculativeTokens": k, "acceptance": alpha, "predictedSpeedup": 1.7}
    return {"metadata": {"name": "chat", "annotations": annotations or {}},
            "spec": {"replicas": 1, "slo": {"concurrency": 4, "promptTokens": 512}}, "status": {"plan": plan}}


def _samples(text: str) -> dict[str, float]:
    """Each series' value by name, summed over label sets (as observe.parse_exposition does)."""
    return parse_exposition(text).values


def _two_scrapes(engine: SimulatedEngine, clock) -> tuple[str, str]:
    first = engine.metrics()
    clock.t += WINDOW
    return first, engine.metrics()


def test_the_draft_length_is_read_from_the_arguments_the_renderer_writes(make_inventory):
    inventory = make_inventory(*[n for n in load_docs(CLUSTERS / "l40s.yaml") if n.get("kind") == "Node"])
    doc = next(d for d in load_docs(EXAMPLES / "speculative.yaml") if d["metadata"]["name"] == "chat-8b-draft")
    spec = parse_spec(doc["spec"])
    chosen = planner.plan(spec, inventory).chosen.to_chosen_plan()
    assert chosen.speculative is not None
    objects = render(Owner(name="chat-8b-draft", namespace="default", uid="u"), spec, chosen)
    container = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = [*container.get("command", []), *container["args"]]
    assert draft_length(args, release(chosen.engine)) == chosen.speculative.numSpeculativeTokens
    assert draft_length([a for a in args if "speculative" not in a and "num_speculative_tokens" not in a],
                        release(chosen.engine)) is None
    llamacpp = release(LLAMACPP)
    flags = llamacpp.speculative.flags
    assert draft_length([flags["type"], "draft-simple", flags["draftMax"], "5"], llamacpp) == 5
    assert draft_length([flags["type"], "draft-simple"], llamacpp) == LLAMACPP_DEFAULT_DRAFT_MAX
    assert draft_length([flags["type"], "ngram-simple"], llamacpp) is None
    assert draft_length(["--metrics"], llamacpp) is None
    assert draft_length(["--speculative-config", '{"num_speculative_tokens":3}'], release("vllm-0.10.2")) is None


@pytest.mark.parametrize("engine", [VLLM, LLAMACPP])
def test_a_pod_with_a_draft_counts_what_the_plan_predicts(clock, engine):
    rel = release(engine)
    alpha, k = 0.78, 3
    pod = SimulatedEngine(rel, "chat", draft_tokens=k)
    t = traffic(_llama(engine, alpha=alpha, k=k), serving_pods=1)
    pod.set_traffic(t)
    first, second = _two_scrapes(pod, clock)
    signals = rel.slo_signals
    before, after = _samples(first), _samples(second)
    drafted = after[signals.draft_tokens] - before[signals.draft_tokens]
    accepted = after[signals.draft_accepted] - before[signals.draft_accepted]
    output = t.requests_per_second * WINDOW * OUTPUT_TOKENS
    # drafted tokens per second = output tokens per second / tokens per verifying pass x k
    assert drafted == pytest.approx(output / tokens_per_pass(alpha, k) * k, abs=2)
    assert accepted / drafted == pytest.approx(acceptance_rate(alpha, k), abs=0.01)
    if rel.engine == "vllm":  # counters with vLLM's labels, as prometheus_client prints them
        assert re.search(rf'^{re.escape(signals.draft_tokens)}{{engine="0",model_name="chat"}} \d+\.0$', second, re.M)
        assert f"# TYPE {signals.draft_accepted} counter" in second
    else:  # llama-server's: no labels
        assert re.search(rf"^{re.escape(signals.draft_tokens)} \d+$", second, re.M) and "{" not in second


@pytest.mark.parametrize("engine", [VLLM, LLAMACPP])
def test_the_annotation_sets_the_acceptance_and_the_loop_reads_it(clock, engine):
    rel = release(engine)
    ld = _llama(engine, alpha=0.78, annotations={DRAFT_ACCEPTANCE: "0.2"})
    pod = SimulatedEngine(rel, "chat", draft_tokens=3)
    pod.set_traffic(traffic(ld, serving_pods=1))
    first, second = _two_scrapes(pod, clock)
    old, new = (relevant(parse_exposition(x), rel.slo_signals) for x in (first, second))
    target = Target("default", "chat", rel.engine, engine, 1.0, 0.0165, 512)
    obs = observation(target, rates_between(old, new, WINDOW, rel.slo_signals), source="pods",
                      sampled_at=datetime.now(timezone.utc))
    assert obs.problem is None
    assert obs.draft_acceptance_rate == pytest.approx(0.2, abs=0.01)
    assert obs.drafted_per_second > 0


def test_a_pod_without_a_draft_exports_what_its_engine_does(clock):
    vllm = SimulatedEngine(release(VLLM), "chat")
    vllm.set_traffic(traffic(_llama(VLLM, alpha=None), serving_pods=1))
    _, text = _two_scrapes(vllm, clock)
    assert "spec_decode" not in text  # vLLM creates them only with a speculative config
    llamacpp = SimulatedEngine(release(LLAMACPP), "chat")
    llamacpp.set_traffic(traffic(_llama(LLAMACPP, alpha=None), serving_pods=1))
    _, text = _two_scrapes(llamacpp, clock)
    values = _samples(text)
    signals = release(LLAMACPP).slo_signals
    assert values[signals.draft_tokens] == values[signals.draft_accepted] == 0  # llama-server always exports them
    assert values[signals.predicted_tokens] > 0


def test_a_pod_keeps_drafting_after_its_plan_drops_the_draft(clock):
    """The plan moved on (DraftOff), the old pod still runs with its draft until it is retired: it keeps the
    acceptance it had."""
    rel = release(VLLM)
    pod = SimulatedEngine(rel, "chat", draft_tokens=3)
    pod.set_traffic(traffic(_llama(VLLM, alpha=0.78, annotations={DRAFT_ACCEPTANCE: "0.2"}), serving_pods=1))
    pod.set_traffic(traffic(_llama(VLLM, alpha=None), serving_pods=1))
    first, second = _two_scrapes(pod, clock)
    s = rel.slo_signals
    drafted = _samples(second)[s.draft_tokens] - _samples(first)[s.draft_tokens]
    accepted = _samples(second)[s.draft_accepted] - _samples(first)[s.draft_accepted]
    assert drafted > 0 and accepted / drafted == pytest.approx(0.2, abs=0.01)


def test_traffic_reads_the_drafts_acceptance_and_ignores_a_bad_annotation():
    assert traffic(_llama(VLLM, alpha=0.7), serving_pods=1).draft_alpha == 0.7
    assert traffic(_llama(VLLM, alpha=None), serving_pods=1).draft_alpha is None
    for bad in ("high", "1.5", "-0.1", "nan"):
        assert traffic(_llama(VLLM, alpha=0.7, annotations={DRAFT_ACCEPTANCE: bad}), 1).draft_rate is None
    assert traffic(_llama(VLLM, alpha=0.7, annotations={DRAFT_ACCEPTANCE: "0"}), 1).draft_rate == 0.0
