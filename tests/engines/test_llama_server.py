"""The operator's rendered llama.cpp command line on a real llama-server (the pinned release, b11434).

What the operator renders for a CPU plan is run as rendered, but for the weights (a local tiny GGUF instead
of a Hugging Face download), the host (127.0.0.1) and the port (a free one): see llama_server.local_args.
The server must start, report its health as Kubernetes' probes read it, answer the OpenAI API under the
served name, and export every series the chart's alert rules and dashboard query.
"""
from __future__ import annotations

import re

import pytest

from llama_operator import ladder
from llama_operator.catalog import load_catalog
from llama_operator.engines import release
from kit.paths import ROOT

from rendered_cases import ALIAS, SPECS, render_kind
from llama_server import LlamaServer, ServerFailed, free_port, local_args

KINDS = sorted(SPECS)  # every KV-cache setting the planner emits for llama.cpp: auto, q8_0
CHART_FILES = ROOT / "charts" / "llama-operator" / "files"


def chat(server, content: str = "Say hello.") -> dict:
    resp = server.post("/v1/chat/completions", {
        "model": ALIAS,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 8,
    })
    assert resp.status == 200, resp.body[:2000]
    return resp.json()


def exported_series(text: str) -> set[str]:
    """Names of the samples in a Prometheus text exposition (a # HELP line alone does not count)."""
    return {re.split(r"[{\s]", line, maxsplit=1)[0] for line in text.splitlines()
            if line.strip() and not line.startswith("#")}


def series_the_chart_reads() -> set[str]:
    names = set()
    for path in (CHART_FILES / "prometheus-rules.yaml", CHART_FILES / "dashboard.json"):
        names |= set(re.findall(r"llamacpp:[a-z_]+", path.read_text()))
    return names


# --- the command line under test -------------------------------------------------------------------------

def test_the_kinds_cover_every_kv_cache_setting_the_planner_emits_for_llamacpp():
    quants = [q for q in load_catalog().quantizations.values() if q.runtime == "llamacpp"]
    assert quants
    assert {"auto"} | {ladder.kv_dtype(q) for q in quants} == set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_the_planner_emits_this_kv_cache_setting_on_cpu(kind):
    r = render_kind(kind)
    assert r.plan.runtime == "llamacpp" and r.plan.gpuProduct is None  # a CPU plan
    assert r.plan.kvCacheDtype == ("auto" if kind == "auto" else "q8_0")
    assert r.arg("--n-gpu-layers") == "0"
    if kind == "auto":
        assert not {"--cache-type-k", "--cache-type-v", "--flash-attn"} & set(r.args)
    else:
        assert (r.arg("--cache-type-k"), r.arg("--cache-type-v"), r.arg("--flash-attn")) == ("q8_0", "q8_0", "on")


def test_only_the_weights_host_and_port_are_swapped(tmp_path):
    rendered = render_kind("q8_0").args
    local = local_args(rendered, tmp_path / "m.gguf", 12345)

    def pairs(args, drop):
        out, i = [], 0
        while i < len(args):
            if args[i] in drop:
                i += 2
            else:
                out.append(args[i])
                i += 1
        return out

    assert pairs(local, {"--model", "--host", "--port"}) == pairs(rendered, {"--hf-repo", "--hf-file", "--host",
                                                                             "--port"})
    assert local[local.index("--model") + 1] == str(tmp_path / "m.gguf")
    assert local[local.index("--host") + 1] == "127.0.0.1" and local[local.index("--port") + 1] == "12345"


# --- the server ------------------------------------------------------------------------------------------

def test_health_is_503_while_loading_then_200(servers, record_property):
    server = servers.get("auto")
    seen = server.startup_statuses
    record_property("health_statuses_while_starting", seen)
    record_property("seconds_to_healthy", server.startup_seconds)
    # Before the port is bound nothing answers; while the model loads llama-server answers 503; then 200.
    # Loading the tiny model may be quicker than a poll, so a 503 is allowed before the 200, not required.
    assert seen[-1] == 200, seen
    assert set(seen[:-1]) <= {"refused", 503}, seen
    resp = server.get("/health")
    assert resp.status == 200 and resp.json().get("status") == "ok", resp.body


@pytest.mark.parametrize("kind", KINDS)
def test_chat_completion_answers_under_the_served_name(servers, kind):
    server = servers.get(kind)
    body = chat(server)
    assert body["model"] == ALIAS
    assert len(body["choices"]) >= 1
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in {"stop", "length"}
    assert 1 <= body["usage"]["completion_tokens"] <= 8


@pytest.mark.parametrize("kind", KINDS)
def test_the_rendered_context_and_slots_take_effect(servers, kind):
    """--parallel slots, each with contextLength tokens (the template's comment on --ctx-size)."""
    spec = render_kind(kind).spec
    props = servers.get(kind).get("/props").json()
    assert props["total_slots"] == spec.slo.concurrency
    assert props["default_generation_settings"]["n_ctx"] == spec.contextLength


@pytest.mark.parametrize(("kind", "cache", "flash_attn"), [("auto", "f16", "auto"), ("q8_0", "q8_0", "enabled")])
def test_the_kv_cache_is_allocated_as_rendered(servers, kind, cache, flash_attn):
    """Accepted is not enough: the cache must be allocated with the rendered types (libllama's own log
    lines, llama-kv-cache.cpp and llama-context.cpp), q8_0 with flash attention on."""
    log = servers.get(kind).stderr(tail=100_000)
    kv = re.search(r"llama_kv_cache: size = .*K \((\w+)\):.*V \((\w+)\):", log)
    assert kv is not None, log[-4000:]
    assert kv.groups() == (cache, cache), kv.group(0)
    fa = re.search(r"llama_context: flash_attn\s+= (\w+)", log)
    assert fa is not None and fa.group(1) == flash_attn, log[-4000:]


def test_metrics_carry_every_series_the_alerts_and_dashboard_read(servers):
    server = servers.get("auto")
    chat(server)  # so that the counters have moved at least once
    resp = server.get("/metrics")
    assert resp.status == 200, resp.body[:500]
    exported = exported_series(resp.body.decode())
    wanted = series_the_chart_reads()
    assert len(wanted) >= 5, wanted  # the files were read
    assert wanted <= exported, f"read by the chart but not exported: {sorted(wanted - exported)}"
    # The engine catalog's list for this release (engines.yaml, metrics.names) is what this server exports.
    catalog = release("llamacpp-b11434").metrics
    assert catalog <= exported, f"in the catalog but not exported: {sorted(catalog - exported)}"


# --- the harness can fail --------------------------------------------------------------------------------

def test_negative_control_an_invalid_flag_value_fails_with_the_servers_stderr(start_server, tiny_gguf):
    port = free_port()
    args = local_args(render_kind("auto").args, tiny_gguf, port) + ["--flash-attn", "maybe"]
    with pytest.raises(ServerFailed) as failed:
        start_server(args, port, health_timeout=30)
    assert failed.value.returncode not in (None, 0), str(failed.value)
    assert "unknown value for --flash-attn: 'maybe'" in failed.value.stderr, failed.value.stderr
    assert failed.value.stderr in str(failed.value)  # the report carries the server's own words


def test_negative_control_a_server_not_healthy_in_time_fails_and_is_stopped(engine, tiny_gguf, tmp_path):
    port = free_port()
    args = local_args(render_kind("auto").args, tiny_gguf, port)
    server = LlamaServer(str(engine.binary), args, tmp_path, port, health_timeout=0.0)
    with pytest.raises(ServerFailed, match="was not healthy within") as failed:
        with server:  # loading takes longer than no time at all
            pass
    assert failed.value.returncode is None  # it was still running when the deadline passed ...
    assert server.proc is not None and server.proc.poll() is not None  # ... and it has been stopped since
