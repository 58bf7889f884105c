"""Engine truth: every rendered command line is one the pinned release accepts, read from its own source.

The option lists in catalog/engine-options/ are generated from the releases' sources
(scripts/engine_options.py: vLLM's wheel, llama.cpp's common/arg.cpp). Here every catalog variant x runtime
x representative GPU (and CPU) is planned and rendered as the operator would, with and without the 8-bit KV
cache, and each command line is parsed against its release's options: an unknown option, a missing value
or a value outside the release's choices fails the test.
"""
from __future__ import annotations

import json
import re

import pytest

from llama_operator import planner
from llama_operator.catalog import CATALOG_DIR, load_catalog, load_yaml
from llama_operator.engines import catalog_problems, rejected_arguments, release, release_for, releases, \
    support_problem
from llama_operator.render import Owner, render

from kit.paths import ROOT

OWNER = Owner(name="chat", namespace="default", uid="0b9f7c7e-3c1e-4f43-9d38-0d7f3f1e2a11")
#: The GPUs the issue names, one per generation and vendor, and a CPU node.
REPRESENTATIVE = ["Tesla-T4", "Tesla-V100-SXM2-32GB", "NVIDIA-A10G", "NVIDIA-L4", "NVIDIA-A100-SXM4-80GB",
                  "NVIDIA-H100-80GB-HBM3", "AMD_Instinct_MI300X_OAM", None]


def _node(make_node, product):
    if product is None:
        return make_node("cpu", cpu="192", memory="2048Gi")
    return make_node("gpu", product, 8, cpu="192", memory="2048Gi")


def _variants():
    catalog = load_catalog()
    for model in catalog.models.values():
        for qid in model.variants():
            yield model, catalog.quantizations[qid]


def _rendered_args(make_spec, make_node, make_inventory, model, quant, product):
    """(release, args) for each KV cache the variant can run with on `product`; [] when it cannot run there."""
    spec = make_spec(model=model.id, runtime=quant.runtime, memoryBudget="4000Gi", contextLength=4096,
                     slo={"ttftP95": "1000s", "tpotP95": "100s", "concurrency": 2},
                     fallback={"quantizations": [quant.id], "allowSmallerModels": False, "allowCPU": product is None})
    inventory = make_inventory(_node(make_node, product))
    p = planner.plan(spec, inventory)
    gpu = None if product is None else load_catalog().find_gpu(product)
    problem = support_problem(model, quant, gpu)
    if problem is not None:
        assert not p.feasible, problem
        return []
    if p.chosen is None:  # runs there, but does not fit even 8 of them (405B in 16 bits on T4s)
        assert any("per GPU" in r or "placement" in r for c in p.candidates for r in c.reasons), p.fallback_reason
        return []
    chosen = p.chosen.to_chosen_plan()
    out = []
    for kv in ("auto", "fp8" if quant.runtime == "vllm" else "q8_0"):
        if support_problem(model, quant, gpu, kv) is not None:
            continue
        objects = render(OWNER, spec, chosen.model_copy(update={"kvCacheDtype": kv}))
        container = objects[0]["spec"]["template"]["spec"]["containers"][0]
        rel = release(chosen.engine)
        assert container["image"] in rel.images.values() and container["command"] == list(rel.command)
        out.append((rel, container["args"]))
    return out


def test_every_variant_on_every_representative_gpu_renders_options_its_release_accepts(
        make_spec, make_node, make_inventory):
    rendered = 0
    per_gpu: dict = {}
    per_variant: dict = {}
    failures = []
    for model, quant in _variants():
        for product in REPRESENTATIVE:
            for rel, args in _rendered_args(make_spec, make_node, make_inventory, model, quant, product):
                rendered += 1
                per_gpu[product] = per_gpu.get(product, 0) + 1
                per_variant[(model.id, quant.id)] = per_variant.get((model.id, quant.id), 0) + 1
                for problem in rejected_arguments(rel, args):
                    failures.append(f"{model.id} {quant.id} on {product or 'cpu'}: {problem}")
    assert not failures, "\n".join(failures)
    # Nothing was skipped by accident: every GPU renders something, and every variant renders somewhere.
    assert set(per_gpu) == set(REPRESENTATIVE), per_gpu
    assert set(per_variant) == {(m.id, q.id) for m, q in _variants()}
    assert rendered > 200


def test_the_check_catches_what_a_release_would_refuse():
    vllm = release_for(load_catalog().model("llama-3.1-8b-instruct"), "vllm")
    good = ["meta-llama/Llama-3.1-8B-Instruct", "--kv-cache-dtype", "fp8", "--dtype", "half"]
    assert rejected_arguments(vllm, good) == []
    assert rejected_arguments(vllm, ["m", "--kv-cache-dtype", "q8_0"])  # llama.cpp's name, not vLLM's
    assert rejected_arguments(vllm, ["m", "--no-such-option"])
    assert rejected_arguments(vllm, ["m", "--max-model-len"])  # a value is missing
    assert rejected_arguments(vllm, ["--max-model-len", "8"])  # `vllm serve` takes the model first
    llamacpp = release_for(load_catalog().model("llama-3.1-8b-instruct"), "llamacpp")
    assert rejected_arguments(llamacpp, ["--flash-attn", "on", "--cache-type-v", "q8_0"]) == []
    assert rejected_arguments(llamacpp, ["--flash-attn"])  # this build wants on/off/auto
    assert rejected_arguments(llamacpp, ["--cache-type-k", "fp8"])


def test_every_release_has_its_generated_option_list_and_the_catalogs_agree():
    assert catalog_problems() == []
    for rel in releases():
        data = json.loads((CATALOG_DIR / rel.options_file).read_text())
        assert (data["engine"], data["version"]) == (rel.engine, rel.version)
        assert data["generatedBy"] == "scripts/engine_options.py"
        assert len(rel.options) > 100


def test_every_fact_cites_the_file_it_was_read_from():
    for rel in releases():
        assert rel.source and "PENDING" not in rel.source, rel.id
        for kernel in rel.kernels.values():
            assert kernel.source and "PENDING" not in kernel.source, (rel.id, kernel.id)
            assert ".py" in kernel.source, (rel.id, kernel.id)


def _names_used(prefix: str) -> set[str]:
    root = ROOT / "charts" / "llama-operator" / "files"
    text = (root / "prometheus-rules.yaml").read_text() + (root / "dashboard.json").read_text()
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in re.findall(prefix + r":[a-z_]+", text)}


@pytest.mark.parametrize("engine", ["vllm", "llamacpp"])
def test_every_metric_the_alerts_read_is_exported_by_a_pinned_release(engine):
    used = _names_used(engine)
    exported = set().union(*(r.metrics for r in releases() if r.engine == engine))
    assert used and used <= exported, used - exported


def test_each_vllm_release_feeds_the_latency_alerts():
    # Every pinned vLLM exports the TTFT histogram and a per-token one the rules read (0.34.0 dropped
    # time_per_output_token_seconds; inter_token_latency_seconds is in both).
    used = _names_used("vllm")
    for rel in releases():
        if rel.engine == "vllm":
            assert "vllm:time_to_first_token_seconds" in rel.metrics & used
            assert rel.metrics & used & {"vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"}


def test_each_release_names_the_slo_loops_signals_among_what_it_exports():
    """The SLO loop reads exactly the series the catalog's sloSignals name (observe.py, observer.py): each must
    be one the release exports (its `metrics`, read from its source), with a source cited; histograms for
    vLLM (a TTFT and a per-request TPOT histogram), time and token totals for llama.cpp."""
    for rel in releases():
        signals = rel.slo_signals
        assert signals.names() and set(signals.names()) <= rel.metrics, (rel.id, set(signals.names()) - rel.metrics)
        if rel.engine == "vllm":
            assert signals.kind == "histograms" and signals.ttft == "vllm:time_to_first_token_seconds"
            assert signals.tpot and signals.generated_tokens
        else:
            assert signals.kind == "counters" and signals.prompt_seconds and signals.predicted_tokens
        assert signals.running and signals.waiting
    raw = {r["id"]: r for r in load_yaml("engines.yaml")["releases"]}
    assert all(".py:" in raw[r.id]["sloSignals"]["source"] or ".cpp:" in raw[r.id]["sloSignals"]["source"]
               for r in releases())
    # The release that dropped time_per_output_token_seconds has the per-request histogram instead.
    assert next(r for r in releases() if r.id == "vllm-0.34.0").slo_signals.tpot == \
        "vllm:request_time_per_output_token_seconds"


# --- LoRA (issue 13): the facts each release's source gives, cited ---------------------------------------

def test_every_lora_flag_is_one_its_release_accepts():
    """Each flag engines.yaml names for LoRA is in the release's generated option list, takes a value or not
    as argparse / arg.cpp say, and (llama.cpp) is a llama-server option."""
    for rel in releases():
        assert rel.lora is not None, rel.id
        for role, flag in rel.lora.flags.items():
            spec = rel.options.get(flag)
            assert spec is not None, (rel.id, role, flag)
            assert spec.get("server", True), (rel.id, flag)
            assert spec["takesValue"] is (role not in {"enable", "initWithoutApply", "noPromptCache"}), (rel.id, flag)
    vllm = release("vllm-0.34.0")
    assert rejected_arguments(vllm, ["m", "--enable-lora", "--max-loras", "4", "--max-lora-rank", "64",
                                     "--max-cpu-loras", "8", "--lora-dtype", "bfloat16",
                                     "--lora-modules", "sql=/adapters/sql"]) == []
    assert rejected_arguments(vllm, ["m", "--enable-lora", "--max-lora-rank", "24"])
    llamacpp = release("llamacpp-b11434")
    assert rejected_arguments(llamacpp, ["--lora", "a.gguf,b.gguf", "--lora-scaled", "c.gguf:0.5",
                                         "--lora-init-without-apply"]) == []


def test_lora_ranks_and_dtypes_are_the_option_lists_choices():
    """Where argparse carries the choices (0.34.0's Literal), the catalog's ranks and dtypes are exactly them;
    0.10.2 checks its ranks in LoRAConfig.__post_init__ instead, so its option list has none to compare."""
    for rel in releases():
        lora = rel.lora
        if rel.engine != "vllm":
            assert lora.rank_choices == () and lora.max_loras_default is None
            continue
        rank_choices = rel.options[lora.flags["maxRank"]]["choices"]
        if rank_choices is None:
            assert "not by argparse" in lora.sources["maxRank"], rel.id
        else:
            assert [int(c) for c in rank_choices] == list(lora.rank_choices), rel.id
        assert lora.rank_default in lora.rank_choices and lora.max_loras_default == 1
        assert sorted(rel.options[lora.flags["dtype"]]["choices"]) == sorted(lora.dtype_choices)
    assert release("vllm-0.34.0").lora.rank_choices == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    assert 1 not in release("vllm-0.10.2").lora.rank_choices


def test_every_lora_fact_cites_the_file_and_line_it_was_read_from():
    raw = {r["id"]: r for r in load_yaml("engines.yaml")["releases"]}
    for rel in releases():
        lora = raw[rel.id]["lora"]
        facts = [k for k, v in lora.items() if isinstance(v, dict) and k not in {"flags", "refused"}]
        assert facts, rel.id
        for fact in facts + ["architectures", "flags"]:
            source = rel.lora.sources.get(fact)
            assert source and re.search(r"\.(py|cpp):\d", source), (rel.id, fact)
        for arch, why in rel.lora.refused.items():
            assert arch in rel.architectures and re.search(r"\.py:\d", why), (rel.id, arch)
        assert not (rel.lora.architectures & set(rel.lora.refused)), rel.id


def test_lora_facts_the_planner_will_rely_on():
    """Mllama takes no LoRA on the release that serves it; text Llama does on both engines; the kernels named
    for a quantized base exist in the release; vLLM adapts the packed Llama modules, embeddings and lm_head."""
    vision = load_catalog().model("llama-3.2-11b-vision-instruct")
    rel = release_for(vision, "vllm")
    assert rel.id == "vllm-0.10.2" and not rel.lora.takes(vision.architecture)
    assert "encoder/decoder" in rel.lora.refused[vision.architecture]
    text = load_catalog().model("llama-3.1-8b-instruct")
    for runtime in ("vllm", "llamacpp"):
        assert release_for(text, runtime).lora.takes(text.architecture)
    vllm = release("vllm-0.34.0").lora
    assert set(vllm.quantized_kernels) == set(release("vllm-0.34.0").kernels)
    assert vllm.packed_modules == {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    assert {"embed_tokens", "lm_head", "o_proj", "down_proj"} <= set(vllm.adapted_modules)
    assert release("llamacpp-b11434").lora.quantized_kernels is None  # any GGUF type takes an adapter


# --- one replica over several nodes (issue 14) ---------------------------------------------------------------

def test_every_multinode_flag_is_one_its_release_accepts():
    """Each flag engines.yaml names for multi-node serving is in the release's generated option list, takes a
    value or not as argparse says, the backend is one of its choices, and every fact cites its source."""
    rel = release("vllm-0.34.0")
    multi = rel.multi_node
    assert multi is not None
    assert set(multi.flags) == {"pipelineParallel", "executorBackend", "nnodes", "nodeRank", "masterAddr",
                                "masterPort", "headless"}
    for role, flag in multi.flags.items():
        spec = rel.options.get(flag)
        assert spec is not None, (role, flag)
        assert spec["takesValue"] is (role != "headless"), flag
    assert multi.executor_backend in rel.options[multi.flags["executorBackend"]]["choices"]
    assert multi.master_port == 29501
    assert multi.lws_env == {"leaderAddress": "LWS_LEADER_ADDRESS", "workerIndex": "LWS_WORKER_INDEX",
                             "groupSize": "LWS_GROUP_SIZE"}
    for fact in ("flags", "executorBackend", "masterPort", "layout", "headless", "hostIpEnv", "leaderWorkerSet"):
        assert re.search(r"\.(py|go):\d", multi.sources[fact]), fact
    # Only the release that is rendered over several nodes says how; the others are never planned so.
    assert [r.id for r in releases() if r.multi_node is not None] == ["vllm-0.34.0"]
    assert rejected_arguments(rel, ["m", "--tensor-parallel-size", "8", "--pipeline-parallel-size", "2",
                                    "--distributed-executor-backend", "mp", "--nnodes", "2",
                                    "--node-rank", "$(LWS_WORKER_INDEX)", "--master-addr", "$(LWS_LEADER_ADDRESS)",
                                    "--master-port", "29501", "--headless"]) == []
    assert rejected_arguments(rel, ["m", "--distributed-executor-backend", "torchrun"])


# --- speculative decoding (issue 18) --------------------------------------------------------------------------

def test_every_speculative_flag_is_one_its_release_accepts_and_every_fact_cites_its_source():
    """Each flag engines.yaml names for drafting is in the release's generated option list and takes a value (a
    llama-server option for llama.cpp); the counters are among what the release exports; every fact cites the
    file and line it was read from; vLLM 0.10.2 refuses draft models, in its words, cited."""
    drafting = [r for r in releases() if r.speculative is not None]
    assert [r.id for r in drafting] == ["vllm-0.34.0", "llamacpp-b11434"]
    for rel in drafting:
        support = rel.speculative
        for role, flag in support.flags.items():
            spec = rel.options.get(flag)
            assert spec is not None and spec["takesValue"] and spec.get("server", True), (rel.id, role, flag)
        assert {support.accepted_metric, support.drafted_metric} <= rel.metrics, rel.id
        for fact, source in support.sources.items():
            assert re.search(r"\.(py|cpp|md):\d", source), (rel.id, fact)
    assert release("vllm-0.34.0").speculative.method == "draft_model"
    assert release("llamacpp-b11434").speculative.method == "draft-simple"
    assert "--draft-max" not in release("llamacpp-b11434").speculative.flags.values()  # removed in this build
    old = release("vllm-0.10.2")
    assert old.speculative is None and "not supported yet" in old.speculative_refused
    raw = next(r for r in load_yaml("engines.yaml")["releases"] if r["id"] == "vllm-0.10.2")
    assert re.search(r"\.py:\d", raw["speculative"]["source"])

