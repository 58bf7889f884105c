"""Speculative decoding (issue 18): spec.speculative, the draft rung, its prediction, its arguments, and the SLO loop
turning a draft off. What a user sees: which plan drafts and why, what the server is told, when a draft goes."""
from __future__ import annotations

import dataclasses
import json
from datetime import timedelta

import pytest

from llama_operator import planner
from llama_operator.api import SpecError, parse_spec
from llama_operator.catalog import load_catalog
from llama_operator.drafts import keep_draft_length
from llama_operator.drafting import acceptance_rate, alpha_for_rate, estimate_with_draft, tokens_per_pass
from llama_operator.engines import rejected_arguments, release
from llama_operator.estimate import Hardware, Workload, estimate
from llama_operator.inventory import Inventory
from llama_operator.observe import Observation
from llama_operator.render import Owner, render
from llama_operator.slo import judge

from test_slo import SETTINGS, T0, Loop, always_fits, seen

OWNER = Owner(name="chat", namespace="team-a", uid="0b7e6e2c-0000-4000-8000-00000000aaaa")
#: The issue's case: Llama 3.1 8B at bf16 only, on one L40S, with a TPOT limit bf16 alone misses by about a
#: quarter (predicted 21 ms against 16.5 ms).
DONE_WHEN = {"model": "llama-3.1-8b-instruct", "memoryBudget": "44Gi",
             "slo": {"ttftP95": "1s", "tpotP95": "16.5ms", "concurrency": 1},
             "fallback": {"quantizations": ["bf16"], "allowSmallerModels": False}}


@pytest.fixture
def l40s(make_node, make_inventory):
    return make_inventory(make_node("l40s", "NVIDIA-L40S", 1))


def spec_of(**overrides):
    merged = {**DONE_WHEN, **overrides}
    merged["slo"] = {**DONE_WHEN["slo"], **overrides.get("slo", {})}
    return parse_spec(merged)


def args_of(objects):
    workload = next(o for o in objects if o["kind"] == "Deployment")
    return workload["spec"]["template"]["spec"]["containers"][0]["args"]


# --- the "done when" -----------------------------------------------------------------------------


def test_8b_bf16_at_concurrency_1_plans_a_1b_draft_and_renders_speculative_config(l40s):
    spec = spec_of()
    plan = planner.plan(spec, l40s)
    bf16 = plan.candidates[0]
    assert bf16.draft is None and bf16.reasons == ["predicted TPOT 21ms > SLO 16.5ms"]
    chosen = plan.chosen
    assert chosen.model.id == "llama-3.1-8b-instruct" and chosen.quant.id == "bf16"
    assert chosen.draft.model.id == "llama-3.2-1b-instruct" and chosen.estimate.tpot_seconds <= 0.0165
    assert not plan.fallback  # the same model and quality: not a fallback, though the reason says why a draft
    assert "predicted TPOT 21ms > SLO 16.5ms" in plan.fallback_reason
    shown = plan.to_dict()["chosen"]["speculative"]
    assert shown["draftModel"] == "llama-3.2-1b-instruct" and shown["predictedSpeedup"] > 1.25
    assert shown["numSpeculativeTokens"] == chosen.estimate.draft_tokens
    args = args_of(render(OWNER, spec, chosen.to_chosen_plan()))
    config = json.loads(args[args.index("--speculative-config") + 1])
    assert config == {"method": "draft_model", "model": "meta-llama/Llama-3.2-1B-Instruct",
                      "num_speculative_tokens": shown["numSpeculativeTokens"]}
    assert rejected_arguments(release(chosen.engine), args) == []


def test_the_same_at_concurrency_32_gets_no_draft(l40s):
    """At 32 requests the verifying pass computes 32 x (k + 1) tokens and the draft steps read 32 caches: the gain
    shrinks (about 1.45x against 1.74x), and bf16 alone is slower there too (24 ms), so the draft misses the
    target. With the default context the 16-bit cache of 32 sequences does not even fit."""
    assert planner.plan(spec_of(slo={"concurrency": 32}), l40s).chosen is None  # the same spec: nothing fits
    for context in (4096, 8192):  # (32 prompts prefilled together take over a second: TTFT allowed 5 s)
        plan = planner.plan(spec_of(contextLength=context, slo={"concurrency": 32, "ttftP95": "5s"}), l40s)
        assert plan.chosen is None or plan.chosen.draft is None
        drafted = [c for c in plan.candidates if c.draft is not None]
        if context == 4096:
            (c,) = drafted
            assert c.estimate.speedup < planner.plan(spec_of(), l40s).chosen.estimate.speedup
            assert any(r.startswith("predicted TPOT") and "SLO 16.5ms" in r for r in c.reasons)
        else:  # bf16 failed on memory, which a draft only adds to: no draft rung is tried
            assert drafted == [] and any("memory budget" in r or "per GPU" in r for r in plan.candidates[0].reasons)


@pytest.mark.parametrize("overrides", [
    {}, {"slo": {"concurrency": 32}, "contextLength": 4096},
    {"fallback": {"quantizations": ["bf16", "fp8"]}}, {"model": "llama-3.3-70b-instruct", "memoryBudget": "200Gi"},
])
def test_mode_off_never_drafts(l40s, make_node, make_inventory, overrides):
    inventories = [l40s, make_inventory(make_node("h100", "NVIDIA-H100-80GB-HBM3", 8))]
    for inventory in inventories:
        plan = planner.plan(spec_of(**overrides, speculative={"mode": "Off"}), inventory)
        assert all(c.draft is None for c in plan.candidates)
        assert plan.to_dict()["chosen"] is None or plan.to_dict()["chosen"]["speculative"] is None


# --- the ladder --------------------------------------------------------------------------------------------


def test_a_draft_comes_before_quantization(l40s):
    plan = planner.plan(spec_of(fallback={"quantizations": ["bf16", "fp8"]}), l40s)
    assert (plan.chosen.quant.id, plan.chosen.draft is not None) == ("bf16", True)
    assert [c.quant.id for c in plan.candidates] == ["bf16", "bf16"]  # fp8 never needed


def test_no_draft_when_the_variant_meets_the_slo_or_fails_on_something_else(l40s):
    easy = planner.plan(spec_of(slo={"tpotP95": "30ms"}), l40s)
    assert easy.chosen.draft is None and len(easy.candidates) == 1
    slow_ttft = planner.plan(spec_of(slo={"ttftP95": "10ms"}), l40s)  # TTFT too: a draft cannot help it
    assert all(c.draft is None for c in slow_ttft.candidates)


def test_auto_plans_no_draft_that_gains_less_than_the_catalog_minimum(make_node, make_inventory):
    """On an H100 8B decodes fast, and the 1B draft's steps cost more of a step: at 64 requests it gains little."""
    h100 = make_inventory(make_node("h100", "NVIDIA-H100-80GB-HBM3", 1))
    base = planner.plan(spec_of(slo={"concurrency": 64, "tpotP95": "1s"}, contextLength=2048, memoryBudget="80Gi"),
                        h100).chosen.estimate.tpot_seconds
    tight = f"{base * 1000 * 0.97:.2f}ms"
    plan = planner.plan(spec_of(slo={"concurrency": 64, "tpotP95": tight}, contextLength=2048, memoryBudget="80Gi"),
                        h100)
    (c,) = [c for c in plan.candidates if c.draft is not None]
    minimum = load_catalog().speculation.min_speedup
    assert c.estimate.speedup < minimum
    assert any(f"Auto drafts from {minimum:g}x" in r and "concurrency 64" in r for r in c.reasons)
    forced = planner.plan(spec_of(slo={"concurrency": 64, "tpotP95": tight}, contextLength=2048, memoryBudget="80Gi",
                                  speculative={"mode": "On"}), h100)
    assert forced.chosen is not None and forced.chosen.draft is not None  # On: the user's call


def test_mode_on_drafts_on_every_rung_that_can(l40s):
    plan = planner.plan(spec_of(slo={"tpotP95": "50ms"}, speculative={"mode": "On"}), l40s)
    assert plan.chosen.draft is not None and plan.chosen.rung == 0 and not plan.fallback


def test_the_draft_length_asked_for_is_kept_else_the_fastest_is_picked(l40s):
    picked = planner.plan(spec_of(), l40s).chosen.estimate
    for k in (1, 2, 5, 8):
        e = planner.plan(spec_of(speculative={"numSpeculativeTokens": k}), l40s).candidates[1].estimate
        assert e.draft_tokens == k and e.tpot_seconds >= picked.tpot_seconds - 1e-12


def test_the_draft_is_counted_in_memory_and_time_to_first_token(l40s):
    plan = planner.plan(spec_of(), l40s)
    without, with_draft = plan.candidates[0].estimate, plan.chosen.estimate
    draft = load_catalog().model("llama-3.2-1b-instruct")
    d = estimate(draft, load_catalog().quantizations["bf16"], Hardware(gpu=plan.chosen.pool.gpu, gpu_count=1),
                 Workload(8192, 1, 512))
    assert with_draft.total_bytes - without.total_bytes == d.weights_bytes + d.kv_cache_bytes == with_draft.draft_bytes
    assert with_draft.ttft_seconds > without.ttft_seconds
    assert plan.chosen.to_chosen_plan().predicted.draftBytes == with_draft.draft_bytes


def test_adapters_and_vision_models_get_no_draft_and_say_why(l40s, make_node, make_inventory):
    lora = planner.plan(spec_of(adapters=[{"name": "support", "source": "hf://acme/support-lora", "rank": 16}]), l40s)
    (c,) = [c for c in lora.candidates if "draft" in " ".join(c.reasons)]
    assert "does not draft for LoRA adapters" in c.reasons[0] and "feature matrix" in c.reasons[0]
    vision = planner.plan(parse_spec({"model": "llama-3.2-11b-vision-instruct", "memoryBudget": "80Gi",
                                      "slo": {"ttftP95": "2s", "tpotP95": "5ms"}}),
                          make_inventory(make_node("h100", "NVIDIA-H100-80GB-HBM3", 8)))
    assert all(c.draft is None for c in vision.candidates)


def test_a_draft_is_planned_on_one_node_only(make_node):
    """405B bf16 spans two 8x H100 nodes; with mode On its only rung drafts, and a draft is planned on one node,
    where 405B bf16 does not fit: nothing spans nodes with a draft."""
    nodes = [make_node(f"h{i}", "NVIDIA-H100-80GB-HBM3", 8, cpu="192", memory="2000Gi") for i in range(2)]
    pair = Inventory.from_manifests(nodes, leaderworkerset=True)
    spec = {"model": "llama-3.1-405b-instruct", "memoryBudget": "1600Gi", "slo": {"ttftP95": "10s", "tpotP95": "1s"},
            "fallback": {"allowQuantization": False, "allowSmallerModels": False}}
    auto = planner.plan(parse_spec(spec), pair)
    assert auto.chosen.nodes_per_replica == 2 and auto.chosen.draft is None
    on = planner.plan(parse_spec({**spec, "speculative": {"mode": "On"}}), pair)
    assert on.chosen is None and all(c.nodes_per_replica == 1 for c in on.candidates if c.draft is not None)


# --- what the server is told --------------------------------------------------------------------------------


def test_llamacpp_drafts_with_the_pinned_builds_own_flags(make_node, make_inventory):
    cpu = make_inventory(make_node("cpu", cpu="32", memory="128Gi"))
    spec = parse_spec({"model": "llama-3.2-3b-instruct", "runtime": "llamacpp", "memoryBudget": "32Gi",
                       "contextLength": 4096, "slo": {"ttftP95": "30s", "tpotP95": "1s", "concurrency": 2},
                       "speculative": {"mode": "On", "numSpeculativeTokens": 4}})
    plan = planner.plan(spec, cpu).chosen
    assert plan.runtime == "llamacpp" and plan.draft.quant.id == "q8_0"
    args = args_of(render(OWNER, spec, plan.to_chosen_plan()))
    i = args.index("--spec-type")
    assert args[i:i + 10] == ["--spec-type", "draft-simple", "--spec-draft-hf", "bartowski/Llama-3.2-1B-Instruct-GGUF",
                              "--spec-draft-model", "Llama-3.2-1B-Instruct-Q8_0.gguf", "--spec-draft-n-max", "4",
                              "--spec-draft-ngl", "0"]
    assert "--draft-max" not in args and "-md" not in args
    assert rejected_arguments(release(plan.engine), args) == []


def test_vllm_0_10_2_refuses_draft_models_in_its_own_words():
    rel = release("vllm-0.10.2")
    assert rel.speculative is None and "draft model is not supported yet" in rel.speculative_refused


# --- the API --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field, words", [
    ({"speculative": {"draftModel": "llama-3.1-70b-instruct"}}, "spec.speculative.draftModel", "not smaller"),
    ({"speculative": {"draftModel": "llama-3.2-11b-vision-instruct"}}, "spec.speculative.draftModel", "vision model"),
    ({"model": "llama-3.2-11b-vision-instruct", "speculative": {"draftModel": "llama-3.2-1b-instruct"}},
     "spec.speculative.draftModel", "not drafted for"),
    ({"model": "llama-3.2-1b-instruct", "speculative": {"mode": "On"}}, "spec.speculative.mode", "no draft"),
    ({"speculative": {"numSpeculativeTokens": 0}}, "spec.speculative.numSpeculativeTokens", ""),
    ({"speculative": {"mode": "always"}}, "spec.speculative.mode", "'Auto', 'On' or 'Off'"),
])
def test_bad_drafts_name_the_field_and_the_fix(overrides, field, words):
    with pytest.raises(SpecError) as info:
        spec_of(**overrides)
    assert any(p.startswith(field + ":") and words in p for p in info.value.problems), info.value.problems


def test_a_3b_draft_may_be_asked_for(l40s):
    plan = planner.plan(spec_of(speculative={"draftModel": "llama-3.2-3b-instruct"}), l40s)
    assert all(c.draft.model.id == "llama-3.2-3b-instruct" for c in plan.candidates if c.draft is not None)


# --- the speed model ---------------------------------------------------------------------------------------------


def test_tokens_per_pass_and_acceptance_rate_invert():
    assert tokens_per_pass(0.0, 4) == 1.0 and tokens_per_pass(1.0, 4) == 5.0
    for alpha in (0.3, 0.6, 0.78, 0.9):
        for k in (1, 3, 8):
            assert abs(alpha_for_rate(acceptance_rate(alpha, k), k) - alpha) < 1e-6


def test_the_gain_shrinks_with_concurrency_and_past_some_length():
    c = load_catalog()
    target, draft, bf16 = c.model("llama-3.1-8b-instruct"), c.model("llama-3.2-1b-instruct"), c.quantizations["bf16"]
    hw = Hardware(gpu=c.find_gpu("L40S"), gpu_count=1)
    gains = [estimate_with_draft(target, bf16, draft, bf16, hw, Workload(2048, n), 0.78, 3).speedup
             for n in (1, 4, 16, 32, 64)]
    assert gains == sorted(gains, reverse=True) and gains[0] > 1.5
    by_length = [estimate_with_draft(target, bf16, draft, bf16, hw, Workload(2048, 1), 0.78, k).speedup
                 for k in range(1, 13)]
    best = by_length.index(max(by_length))
    assert 0 < best < 11 and by_length[-1] < by_length[best]


# --- plans in force -----------------------------------------------------------------------------------------------


def test_rank_and_check_choice_know_the_draft(l40s):
    spec = spec_of()
    chosen = planner.plan(spec, l40s).chosen.to_chosen_plan()
    plain = chosen.model_copy(update={"speculative": None})
    assert planner.rank(spec, plain) < planner.rank(spec, chosen)  # Auto: the variant alone is better, if it works
    on = spec_of(speculative={"mode": "On"})
    assert planner.rank(on, chosen) < planner.rank(on, plain)
    off = spec_of(speculative={"mode": "Off"})
    assert planner.rank(off, chosen) > planner.rank(off, plain)
    assert planner.check_choice(spec, l40s, chosen) == []
    assert planner.check_choice(spec, l40s, chosen, drafts_off="20% accepted") == ["the draft was turned off: 20% accepted"]
    assert chosen.variant == "llama-3.1-8b-instruct/bf16+llama-3.2-1b-instruct"
    assert not chosen.same_choice(plain)


# --- the SLO loop ------------------------------------------------------------------------------------------------


def drafting(at, *, rate: float, drafted_per_second=50.0, running=1.0, **kw) -> Observation:
    return dataclasses.replace(seen(at, running=running, **kw), draft_acceptance_rate=rate,
                               drafted_per_second=drafted_per_second)


def test_low_acceptance_turns_the_draft_off_after_the_window_and_the_ladder_moves_on(l40s):
    spec = spec_of(fallback={"quantizations": ["bf16", "fp8"]})
    loop = Loop(spec, l40s)
    s = loop.status.plan.speculative
    assert s is not None and s.minAcceptanceRate is not None
    low = s.minAcceptanceRate / 2
    for t in (0, 30):
        j, _ = loop.step(drafting(T0, rate=low, tpot=0.012), T0 + timedelta(seconds=t))
        assert j.action is None and loop.status.plan.speculative is not None
        assert loop.status.observed.draftAcceptanceRate == pytest.approx(low, rel=1e-3)
    j, _ = loop.step(drafting(T0, rate=low, tpot=0.012), T0 + timedelta(seconds=60))
    assert j.action == "DraftOff" and loop.status.slo.draftsOff.startswith(f"{low:.0%} of drafted tokens")
    assert loop.status.plan.speculative is None and loop.status.plan.quantization == "fp8"
    (event,) = [m for _, r, m in loop.events if r == "DraftOff"]
    assert "Turning the llama-3.2-1b-instruct draft off" in event and "planning without drafts for 1h" in event
    # still off an hour less a minute later, then forgotten: the draft may be planned again (after the upgrade delay)
    j, _ = loop.step(seen(T0, tpot=0.012), T0 + timedelta(minutes=59, seconds=59))
    assert j.drafts_off is not None
    j, _ = loop.step(seen(T0, tpot=0.012), T0 + timedelta(hours=1, seconds=61))
    assert j.drafts_off is None


def test_the_acceptance_measured_is_what_the_planner_predicts_with_in_mode_on_only(l40s):
    """Mode On keeps its draft: the measured acceptance corrects its prediction. In Auto a low one acts through
    DraftOff only (slo.py): handed to the planner, it would fail the plan in force on one reading."""
    auto = Loop(spec_of(), l40s)
    j, _ = auto.step(drafting(T0, rate=0.7, tpot=0.01), T0)
    assert j.action is None and j.measured_acceptance == {}
    loop = Loop(spec_of(speculative={"mode": "On"}), l40s)
    j, _ = loop.step(drafting(T0, rate=0.7, tpot=0.01), T0)
    assert j.action is None
    k = loop.status.plan.speculative.numSpeculativeTokens
    assert j.measured_acceptance == {("llama-3.1-8b-instruct", "llama-3.2-1b-instruct"):
                                     pytest.approx(alpha_for_rate(0.7, k), rel=1e-2)}
    replanned = planner.plan(loop.spec, l40s, measured=j.measured_acceptance).chosen
    assert replanned.speculative()["acceptanceSource"] == "measured"


def test_too_few_drafted_tokens_or_mode_on_or_observe_never_turn_it_off(l40s):
    for spec, obs in [(spec_of(), dict(drafted_per_second=0.01)),
                      (spec_of(speculative={"mode": "On"}), {}),
                      (spec_of(sloPolicy="observe"), {})]:
        loop = Loop(spec, l40s)
        for t in range(0, 181, 30):
            j, _ = loop.step(drafting(T0, rate=0.01, tpot=0.012, **obs), T0 + timedelta(seconds=t))
            assert j.action != "DraftOff"
        assert loop.status.plan.speculative is not None


def test_load_above_where_the_draft_pays_turns_it_off_only_when_no_replica_can_be_added(l40s):
    spec = spec_of(fallback={"quantizations": ["bf16", "fp8"]})
    loop = Loop(spec, l40s)
    busy = loop.status.plan.speculative.paysUpToConcurrency + 5
    for t in (0, 30, 60):
        j, _ = loop.step(drafting(T0, rate=0.6, running=busy, tpot=0.012), T0 + timedelta(seconds=t),
                         fits=lambda n: False)
    assert j.action == "DraftOff" and "requests run per replica" in loop.status.slo.draftsOff
    assert "no replica could be added" in loop.status.slo.draftsOff


def test_judge_without_a_draft_reports_no_acceptance(l40s):
    loop = Loop(spec_of(slo={"tpotP95": "30ms"}), l40s)
    j = judge(loop.status, seen(T0), loop.spec, T0, SETTINGS, always_fits)
    assert j.measured_acceptance == {} and j.observed.draftAcceptanceRate is None


def test_servers_that_write_tokens_and_draft_none_lose_the_draft(l40s):
    """llama.cpp serves on without a draft it refused (tests/engines shows it): the gain planned is not there."""
    loop = Loop(spec_of(fallback={"quantizations": ["bf16", "fp8"]}), l40s)
    for t in (0, 30, 60):
        j, _ = loop.step(dataclasses.replace(seen(T0, tpot=0.02), drafted_per_second=0.0), T0 + timedelta(seconds=t))
    assert j.action == "DraftOff" and "drafted none" in loop.status.slo.draftsOff
    assert loop.status.plan.speculative is None


def test_a_draft_keeps_its_length_while_it_runs(l40s):
    """A measured acceptance refreshes the prediction (mode On); the servers are not rolled out for another draft
    length."""
    on = spec_of(speculative={"mode": "On"})
    loop = Loop(on, l40s)
    k = loop.status.plan.speculative.numSpeculativeTokens
    free = planner.plan(on, l40s, measured={("llama-3.1-8b-instruct", "llama-3.2-1b-instruct"): 0.95}).chosen
    assert free.estimate.draft_tokens != k  # left to itself, the planner would pick a longer draft at 0.95
    for t in (0, 30, 60, 90):
        loop.step(drafting(T0, rate=acceptance_rate(0.95, k), tpot=0.01), T0 + timedelta(seconds=t))
        assert loop.status.plan.speculative.numSpeculativeTokens == k and loop.status.pendingChange is None
    assert loop.status.plan.speculative.acceptanceSource == "measured"
    assert loop.status.plan.speculative.acceptance == 0.95
    assert keep_draft_length(spec_of(speculative={"numSpeculativeTokens": 5}), loop.status.plan).speculative \
        .numSpeculativeTokens == 5  # a length the spec asks for is the spec's
