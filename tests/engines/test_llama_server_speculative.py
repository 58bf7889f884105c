"""Speculative decoding on a real llama-server (b11434): the command line the operator renders for a plan with a
draft model (status.plan.speculative; render/speculative.py, from catalog/engines.yaml `speculative`).

Run as rendered but for the target's and the draft's files (the tiny model, and a tiny draft of the same
vocabulary from tiny_draft_gguf.py), the host and the port: llama_server.local_args. What a user would notice:
every slot speculates; a response's timings count the tokens drafted and accepted; /metrics' counters grow by
as much, and the operator's own reading of them (observe.py) gives the acceptance status.observed shows
(draftAcceptanceRate); greedy answers are the ones the same command line gives without the draft. And two ways a
draft is loaded and then not used, with no error at start-up: the command line without `--spec-type draft-simple`
(why it is rendered), and a draft whose vocabulary does not match the model's. Both serve as usual; what gives
them away is an observation with traffic but no acceptance.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone

import pytest

from llama_operator.engines import rejected_arguments, release
from llama_operator.observe import Observation, Scrape, Target, observation, parse_exposition, rates_between
from llama_operator.render.speculative import draft_args
from llama_operator.slo import _observed_status

from llama_server import free_port, local_args
from rendered_cases import ALIAS, OWNER, SPECULATIVE_SPECS, Rendered, draft_stand_in, render_kind
from tiny_draft_gguf import COMPATIBLE, tiny_draft_gguf

KINDS = sorted(SPECULATIVE_SPECS)  # draft (16-bit KV cache), draft-q8_0 (8-bit, the draft's too)
PROMPTS = ("I believe the meaning of life is", "Once upon a time", "The capital of France is",
           "def fibonacci(n):", "Hello")
CPU_LAYERS = 0  # the kinds are CPU plans: no layer on a GPU, the target's nor the draft's
DRAFTED = "llamacpp:spec_decode_num_draft_tokens_total"
ACCEPTED = "llamacpp:spec_decode_num_accepted_tokens_total"
DRAFTS = "llamacpp:spec_decode_num_drafts_total"


def complete(server, prompt: str) -> dict:
    """Greedy (temperature 0, fixed seed): the same weights give the same tokens. 32 tokens, so that there is
    something to draft."""
    resp = server.post("/completion", {"prompt": prompt, "n_predict": 32, "temperature": 0, "seed": 1},
                       timeout=120)
    assert resp.status == 200, resp.body[:2000]
    return resp.json()


def chat(server, content: str) -> dict:
    """What a client of the deployment sends: the OpenAI API under the served name."""
    resp = server.post("/v1/chat/completions", {
        "model": ALIAS, "messages": [{"role": "user", "content": content}], "temperature": 0, "seed": 1,
        "max_tokens": 32, "ignore_eos": True,  # random weights may pick end-of-turn first; drafting needs tokens
    }, timeout=120)
    assert resp.status == 200, resp.body[:2000]
    return resp.json()


def scrape(server) -> Scrape:
    """The server's /metrics as the operator's pod scraper reads it (observe.parse_exposition)."""
    resp = server.get("/metrics")
    assert resp.status == 200, resp.body[:500]
    return parse_exposition(resp.body.decode())


def observe(rendered: Rendered, old: Scrape, new: Scrape, seconds: float) -> Observation:
    """What the SLO loop makes of two scrapes of one pod `seconds` apart (the PodScraper's path after parsing)."""
    slo = rendered.spec.slo
    target = Target(OWNER.namespace, OWNER.name, rendered.plan.runtime, rendered.plan.engine, slo.ttft_seconds,
                    slo.tpot_seconds, prompt_tokens=200)
    rates = rates_between(old, new, seconds, release(rendered.plan.engine).slo_signals)
    return observation(target, rates, source="pods", sampled_at=datetime.now(timezone.utc))


def speculating(server) -> list[bool]:
    """/slots' `speculative` of each slot: whether the slot has a draft context to draft with."""
    resp = server.get("/slots")
    assert resp.status == 200, resp.body[:500]
    return [slot["speculative"] for slot in resp.json()]


def without(args: list[str], part: list[str]) -> list[str]:
    """`args` without `part`, which must be in it once, in one piece."""
    starts = [i for i in range(len(args) - len(part) + 1) if args[i:i + len(part)] == part]
    assert len(starts) == 1, (part, args)
    return args[:starts[0]] + args[starts[0] + len(part):]


def draft_file_and_repo(rendered: Rendered) -> tuple[str, str]:
    org, name, file = rendered.plan.speculative.draftWeightsSource.split("/", 2)
    return f"{org}/{name}", file


# --- the command line under test -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_the_planner_drafts_the_3b_with_the_1b_on_cpu(kind):
    r = render_kind(kind)
    assert r.plan.runtime == "llamacpp" and r.plan.gpuProduct is None  # a CPU plan
    assert r.plan.model == "llama-3.2-3b-instruct"
    assert r.plan.kvCacheDtype == ("q8_0" if kind == "draft-q8_0" else "auto")
    s = r.plan.speculative
    assert s is not None and s.draftModel == "llama-3.2-1b-instruct"
    assert s.numSpeculativeTokens >= 1  # 0 is accepted by b11434 and still drafts one token a step


@pytest.mark.parametrize("kind", KINDS)
def test_the_rendered_draft_is_a_command_line_the_release_accepts(kind):
    r = render_kind(kind)
    assert rejected_arguments(release(r.plan.engine), r.args) == []
    repo, file = draft_file_and_repo(r)
    assert r.arg("--spec-type") == "draft-simple"
    assert (r.arg("--spec-draft-hf"), r.arg("--spec-draft-model")) == (repo, file)
    assert r.arg("--spec-draft-n-max") == str(r.plan.speculative.numSpeculativeTokens)
    assert r.arg("--spec-draft-ngl") == "0"  # the target's layers stay on the CPU, so do the draft's
    if r.plan.kvCacheDtype == "auto":
        assert not {"--spec-draft-type-k", "--spec-draft-type-v"} & set(r.args)
    else:
        assert (r.arg("--spec-draft-type-k"), r.arg("--spec-draft-type-v")) == ("q8_0", "q8_0")
    # The draft's arguments, in one piece: what the tests below take away to run the same line without them.
    without(r.args, draft_args(r.plan, release(r.plan.engine), CPU_LAYERS))


def test_only_the_weights_the_draft_host_and_port_are_swapped(tmp_path):
    for kind in KINDS:
        r = render_kind(kind)
        model, draft = tmp_path / "m.gguf", tmp_path / "d.gguf"
        local = local_args(r.args, model, 12345, draft=draft)
        repo, _ = draft_file_and_repo(r)
        # --hf-repo R --hf-file F -> --model M; --spec-draft-hf R --spec-draft-model F -> --spec-draft-model D.
        expected = list(r.args)
        expected[expected.index("--spec-draft-model") + 1] = str(draft)
        expected = without(expected, ["--spec-draft-hf", repo])
        expected[expected.index("--hf-repo"):expected.index("--hf-repo") + 4] = ["--model", str(model)]
        expected[expected.index("--host") + 1] = "127.0.0.1"
        expected[expected.index("--port") + 1] = "12345"
        assert local == expected
        assert local[local.index("--spec-type") + 1] == "draft-simple"
        assert local[local.index("--spec-draft-n-max") + 1] == r.arg("--spec-draft-n-max")
    with pytest.raises(AssertionError, match="no local stand-in for the rendered draft"):
        local_args(render_kind("draft").args, tmp_path / "m.gguf", 1)


# --- the server ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_every_slot_speculates(servers, kind):
    spec = render_kind(kind).spec
    assert speculating(servers.get(kind)) == [True] * spec.slo.concurrency


@pytest.mark.parametrize(("kind", "cache"), [("draft", "f16"), ("draft-q8_0", "q8_0")])
def test_the_draft_kv_cache_is_allocated_as_rendered(servers, kind, cache):
    """The draft has a KV cache of its own, typed by --spec-draft-type-k/-v only (f16 without them): libllama's
    line for it follows the draft's loading."""
    log = servers.get(kind).stderr(tail=100_000)
    target_log, sep, draft_log = log.partition("loading draft model")
    assert sep, log[-4000:]
    kv = r"llama_kv_cache: size = .*K \((\w+)\):.*V \((\w+)\):"
    for part in (target_log, draft_log):
        found = re.search(kv, part)
        assert found is not None and found.groups() == (cache, cache), (found and found.group(0), log[-4000:])
    assert "speculative decoding context initialized" in draft_log


@pytest.mark.parametrize("kind", KINDS)
def test_drafted_and_accepted_tokens_are_counted_and_the_operator_reads_the_acceptance(servers, kind):
    r = render_kind(kind)
    server = servers.get(kind)
    # /metrics is answered on the server's task loop, after the slot that answered has added its counts
    # (tools/server/server-context.cpp: send_final_response then release, which flushes them), so a scrape
    # right after a response counts it.
    before = scrape(server)
    timings = [chat(server, prompt)["timings"] for prompt in PROMPTS[:2]]
    after = scrape(server)

    for t in timings:
        assert t["draft_n"] > 0 and 0 <= t["draft_n_accepted"] <= t["draft_n"], t
    drafted = sum(t["draft_n"] for t in timings)
    accepted = sum(t["draft_n_accepted"] for t in timings)
    assert after.values[DRAFTED] - before.values[DRAFTED] == drafted
    assert after.values[ACCEPTED] - before.values[ACCEPTED] == accepted
    assert after.values[DRAFTS] > before.values[DRAFTS]

    seen = observe(r, before, after, seconds=10.0)
    assert seen.problem is None, seen.problem
    assert seen.draft_acceptance_rate == pytest.approx(accepted / drafted)
    assert seen.drafted_per_second == pytest.approx(drafted / 10.0)
    status = _observed_status(seen)  # status.observed, as the loop writes it
    assert status.draftAcceptanceRate == pytest.approx(accepted / drafted, rel=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_answers_are_the_same_with_and_without_the_draft(servers, start_server, tiny_gguf, kind):
    """Lossless: the target verifies every drafted token, so the answer is the target's alone; shown on prompts
    where the draft also proposed tokens the target did not take."""
    r = render_kind(kind)
    with_draft = [complete(servers.get(kind), prompt) for prompt in PROMPTS]
    port = free_port()
    plain_args = local_args(without(r.args, draft_args(r.plan, release(r.plan.engine), CPU_LAYERS)), tiny_gguf, port)
    assert not [a for a in plain_args if a.startswith("--spec-")]
    plain = start_server(plain_args, port)
    for prompt, answer in zip(PROMPTS, with_draft):
        assert answer["content"] == complete(plain, prompt)["content"], prompt
    drafted = sum(a["timings"]["draft_n"] for a in with_draft)
    accepted = sum(a["timings"]["draft_n_accepted"] for a in with_draft)
    assert 0 < accepted < drafted, (accepted, drafted)  # some proposals were right, some were turned down


def test_without_spec_type_the_draft_is_loaded_but_never_used(servers, start_server, tiny_gguf):
    """Why --spec-type draft-simple is rendered: b11434's speculative types default to none and a plain draft
    model names none, so the server loads the draft, finds nothing to draft with and frees it
    (common/speculative.cpp:2785-2788, tools/server/server-context.cpp:1407-1413). It says so only at trace
    level, and the release takes the command line as it is."""
    r = render_kind("draft")
    port = free_port()
    args = without(local_args(r.args, tiny_gguf, port, draft=draft_stand_in(r, tiny_gguf)),
                   ["--spec-type", "draft-simple"])
    assert rejected_arguments(release(r.plan.engine), without(r.args, ["--spec-type", "draft-simple"])) == []
    server = start_server(args, port)
    log = server.stderr(tail=100_000)
    assert "loading draft model" in log
    assert "no implementations specified for speculative decoding" in log  # a trace line (verbosity 4 here)
    assert speculating(server) == [False] * r.spec.slo.concurrency

    before = scrape(server)
    answer = chat(server, PROMPTS[0])
    after = scrape(server)
    assert answer["usage"]["completion_tokens"] == 32
    assert "draft_n" not in answer["timings"]
    assert after.values[DRAFTED] == after.values[ACCEPTED] == after.values[DRAFTS] == 0
    seen = observe(r, before, after, seconds=10.0)
    assert seen.problem is None and seen.traffic
    # counted, and none drafted while tokens were written: what the SLO loop takes for a draft not in use
    assert seen.draft_acceptance_rate is None and seen.drafted_per_second == 0.0
    # With --spec-type the same command line drafts (test_every_slot_speculates); the answer is the same.
    assert answer["choices"][0]["message"]["content"] == chat(servers.get("draft"), PROMPTS[0])["choices"][0][
        "message"]["content"]


def test_a_draft_of_another_vocabulary_leaves_the_server_serving_without_speculation(
        servers, start_server, tiny_gguf):
    """A draft whose vocabulary is 256 tokens larger (the limit is 128) is no start-up failure: the server logs
    an error, drops the draft and serves with the model alone. A user sees the deployment answer as usual, with
    tokens per second but no draft acceptance in status.observed (and the error in the server's log)."""
    assert not COMPATIBLE["extra-256"]
    r = render_kind("draft")
    port = free_port()
    server = start_server(local_args(r.args, tiny_gguf, port, draft=tiny_draft_gguf(tiny_gguf, "extra-256")), port)
    log = server.stderr(tail=100_000)
    assert "the target and draft vocabs are not compatible" in log
    assert ("failed to initialize speculative decoding context: draft model vocab type must match target model "
            "to use speculation") in log
    assert speculating(server) == [False] * r.spec.slo.concurrency

    before = scrape(server)
    answer = chat(server, PROMPTS[0])
    after = scrape(server)
    assert answer["usage"]["completion_tokens"] == 32 and "draft_n" not in answer["timings"]
    assert after.values[DRAFTED] == after.values[DRAFTS] == 0
    seen = observe(r, before, after, seconds=10.0)
    assert seen.problem is None and seen.traffic and seen.tokens_per_second > 0
    assert seen.draft_acceptance_rate is None and seen.drafted_per_second == 0.0
    status = _observed_status(seen)
    assert status.tokensPerSecond and status.draftAcceptanceRate is None and status.draftedTokensPerSecond == 0.0
    # Same answer as with the compatible draft: the model alone answers either way.
    assert answer["choices"][0]["message"]["content"] == chat(servers.get("draft"), PROMPTS[0])["choices"][0][
        "message"]["content"]
