"""Fine-tunes on a real llama-server (b11434): the command line the operator renders for LoRA adapters
(spec.adapters, GGUF files) and for a full fine-tune as one GGUF file (spec.weights.gguf).

Run as rendered but for the weights (the tiny model), each adapter's file (a tiny adapter of the same name,
tiny_lora_gguf.py), the host and the port: llama_server.local_args. What a user would notice: the server
starts with the adapters loaded, GET /lora-adapters lists them with ids in spec.adapters order (the id a
request gives in `lora`), one adapter applies to every request, several apply only to a request that asks
for one by id, and an adapter that does not fit the model stops the start with the server's own words.
"""
from __future__ import annotations

import pytest
from llama_operator.engines import rejected_arguments, release
from llama_server import ServerFailed, free_port, local_args
from rendered_cases import (
    ALIAS,
    FINETUNE_SPECS,
    adapter_paths,
    adapter_stand_ins,
    render_kind,
)
from tiny_lora_gguf import tiny_lora_gguf

LORA_KINDS = ["lora-one", "lora-two"]


def completion(server, lora: list[dict] | None = None) -> str:
    """Greedy (temperature 0, fixed seed), so that the same weights and adapters give the same text."""
    body = {"model": ALIAS, "messages": [{"role": "user", "content": "Say hello."}],
            "temperature": 0, "seed": 7, "max_tokens": 8}
    if lora is not None:
        body["lora"] = lora
    resp = server.post("/v1/chat/completions", body)
    assert resp.status == 200, resp.body[:2000]
    return resp.json()["choices"][0]["message"]["content"]


# --- the command line under test -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(FINETUNE_SPECS))
def test_the_rendered_fine_tune_is_a_command_line_the_release_accepts(kind):
    r = render_kind(kind)
    assert r.plan.runtime == "llamacpp" and r.plan.gpuProduct is None
    assert rejected_arguments(release(r.plan.engine), r.args) == []


def test_one_adapter_is_given_with_lora_several_with_lora_scaled_at_0():
    one, two = render_kind("lora-one"), render_kind("lora-two")
    (path,) = adapter_paths(one)
    assert one.args[one.args.index("--lora"):][:2] == ["--lora", path]
    assert "--lora-scaled" not in one.args
    scaled = [two.args[i + 1] for i, a in enumerate(two.args) if a == "--lora-scaled"]
    assert scaled == [f"{p}:0" for p in adapter_paths(two)]
    assert "--lora" not in two.args and "--lora-init-without-apply" not in two.args


SWAPPED = {"--model", "--hf-repo", "--hf-file", "--host", "--port", "--lora", "--lora-scaled"}


def kept(args: list[str]) -> list[str]:
    """The arguments with the swapped flags' values dropped, --hf-repo/--hf-file as the one --model."""
    out, i = [], 0
    while i < len(args):
        if args[i] in SWAPPED:
            out.append(args[i] if args[i] not in ("--hf-repo", "--hf-file") else "--model")
            i += 2
        else:
            out.append(args[i])
            i += 1
    return [a for j, a in enumerate(out) if not (a == "--model" and "--model" in out[:j])]


def test_only_the_weights_adapters_host_and_port_are_swapped(tmp_path):
    for kind in ("lora-two", "weights-gguf"):
        r = render_kind(kind)
        stand_ins = {p: tmp_path / f"adapter-{i}.gguf" for i, p in enumerate(adapter_paths(r))}
        local = local_args(r.args, tmp_path / "m.gguf", 12345, stand_ins)
        assert len(local) == len(r.args) - (2 if "--hf-repo" in r.args else 0)
        assert kept(local) == kept(r.args)
        assert local[local.index("--model") + 1] == str(tmp_path / "m.gguf")
        scaled = [local[i + 1] for i, a in enumerate(local) if a == "--lora-scaled"]
        assert scaled == [f"{stand_ins[p]}:0" for p in adapter_paths(r)]
    with pytest.raises(AssertionError, match="no local stand-in"):
        local_args(render_kind("lora-one").args, tmp_path / "m.gguf", 1, {})


# --- the server ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", LORA_KINDS)
def test_the_adapters_are_loaded_with_their_ids_in_spec_order(servers, kind):
    r = render_kind(kind)
    resp = servers.get(kind).get("/lora-adapters")
    assert resp.status == 200, resp.body[:2000]
    loaded = resp.json()
    stand_ins = adapter_stand_ins(r)
    assert [(a["id"], a["path"]) for a in loaded] == [
        (i, str(stand_ins[p])) for i, p in enumerate(adapter_paths(r))]
    # One adapter applies to every request; of several, none until a request asks for one by id.
    want = 1.0 if len(r.spec.adapters) == 1 else 0.0
    assert [a["scale"] for a in loaded] == [want] * len(r.spec.adapters), loaded


def test_with_one_adapter_every_request_gets_it(servers):
    base = completion(servers.get("auto"))  # the same command line without the adapter
    server = servers.get("lora-one")
    plain = completion(server)
    assert plain == completion(server, [{"id": 0, "scale": 1.0}])
    assert plain != base
    assert completion(server, [{"id": 0, "scale": 0.0}]) == base


def test_with_several_adapters_a_request_gets_the_one_it_asks_for_by_id(servers):
    base = completion(servers.get("auto"))
    server = servers.get("lora-two")
    assert completion(server) == base  # no adapter unless asked for: the base model under the deployment's name
    first = completion(server, [{"id": 0, "scale": 1.0}])
    second = completion(server, [{"id": 1, "scale": 1.0}])
    assert first != base and second != base and first != second, (base, first, second)
    # Asking once changes no default: a request that gives the scales (all 0) is the base model again.
    assert completion(server, [{"id": 0, "scale": 0.0}]) == base
    assert completion(server) == base


@pytest.mark.parametrize("kind", LORA_KINDS)
def test_prompt_caching_is_off_so_no_request_reuses_a_cache_another_adapter_computed(servers, kind):
    """The rendered --no-cache-prompt at work (the defect it avoids is the next test's): after an adapter
    request, the same prompt without `lora` gets the default's answer, not the adapter's."""
    r = render_kind(kind)
    assert "--no-cache-prompt" in r.args
    server = servers.get(kind)
    default = completion(server)
    other = [{"id": 0, "scale": 0.0 if kind == "lora-one" else 1.0}]  # not what the default applies
    assert completion(server, other) != default
    assert completion(server) == default


def test_b11434_without_no_cache_prompt_a_request_without_lora_reuses_another_adapters_cache(
        start_server, tiny_gguf, servers):
    """The engine defect --no-cache-prompt avoids, recorded on the rendered command line without that flag: a
    slot clears its cached prompt when the adapters change only if the request carries `lora`
    (tools/server/server-context.cpp:1841-1856). One without it takes the default scales (all 0 here) and
    reuses the KV cache an adapter computed for the same prompt (:3442-3444), and since the slot now says
    "all 0", a later request that asks for the base model explicitly reuses it too. If this starts failing,
    the release has fixed it, and the flag may go."""
    base = completion(servers.get("auto"))
    r = render_kind("lora-two")
    port = free_port()
    args = [a for a in local_args(r.args, tiny_gguf, port, adapter_stand_ins(r)) if a != "--no-cache-prompt"]
    server = start_server(args, port)
    assert completion(server, [{"id": 0, "scale": 0.0}]) == base
    adapted = completion(server, [{"id": 1, "scale": 1.0}])
    leaked = completion(server)  # the same prompt, no `lora`: the cached prompt carries adapter 1
    assert leaked != base, (base, adapted, leaked)
    assert completion(server, [{"id": 0, "scale": 0.0}]) == leaked  # and now so does an explicit base request


# --- the harness can fail --------------------------------------------------------------------------------

def test_negative_control_an_adapter_of_the_wrong_shape_stops_the_start(start_server, tiny_gguf):
    port = free_port()
    r = render_kind("lora-one")
    (path,) = adapter_paths(r)
    args = local_args(r.args, tiny_gguf, port, {path: tiny_lora_gguf("wrong-shape")})
    with pytest.raises(ServerFailed) as failed:
        start_server(args, port, health_timeout=30)
    assert failed.value.returncode not in (None, 0), str(failed.value)
    assert "blk.0.attn_q.weight' has incorrect shape" in failed.value.stderr, failed.value.stderr
    assert "failed to load lora adapter" in failed.value.stderr, failed.value.stderr
    assert failed.value.stderr in str(failed.value)  # the report carries the server's own words
