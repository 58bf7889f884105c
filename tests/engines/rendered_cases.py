"""The LlamaDeployments tests/engines runs, planned and rendered exactly as the operator does."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llama_operator import planner
from llama_operator.api import LlamaDeploymentSpec, parse_spec
from llama_operator.status import ChosenPlan
from llama_operator.inventory import Inventory
from llama_operator.render import Owner, render
from llama_operator.render.sources import pod_sources

from kit.examples import cluster_nodes

from tiny_draft_gguf import tiny_draft_gguf
from tiny_lora_gguf import tiny_lora_gguf

OWNER = Owner(name="tiny", namespace="default", uid="0b7e6e2c-0000-4000-8000-000000000001")
ALIAS = OWNER.name  # the renderer serves the model under the LlamaDeployment's name (--alias)

#: The LlamaDeployments the tests render, one per KV-cache setting the planner can emit for llama.cpp:
#: "auto" (no cache flags) and "q8_0" (--cache-type-k/-v q8_0 --flash-attn on). The second is the
#: planner's own choice: a context whose 16-bit cache does not fit the memory budget, only f16 weights
#: allowed and no smaller model, so the rung that fits is "f16 with 8-bit KV cache".
SPECS: dict[str, dict] = {
    "auto": {
        "model": "llama-3.2-1b-instruct", "runtime": "llamacpp", "contextLength": 4096, "memoryBudget": "8Gi",
        "slo": {"ttftP95": "10s", "tpotP95": "1s", "concurrency": 2},
    },
    "q8_0": {
        "model": "llama-3.2-1b-instruct", "runtime": "llamacpp", "contextLength": 65536, "memoryBudget": "5Gi",
        "slo": {"ttftP95": "30s", "tpotP95": "2s", "concurrency": 2},
        "fallback": {"allowSmallerModels": False, "quantizations": ["f16"]},
    },
}

#: Fine-tunes (issue 13), planned and rendered the same way: LoRA adapters as GGUF files from the Hugging Face
#: Hub, one (applied to every request) and two (each applied only when a request asks for it by id, in
#: spec order), and a full fine-tune as one GGUF file (spec.weights.gguf, loaded with --model). Kept apart
#: from SPECS, whose kinds are the KV-cache settings.
FINETUNE_SPECS: dict[str, dict] = {
    "lora-one": {
        **SPECS["auto"],
        "adapters": [{"name": "support", "source": "hf://acme/tiny-lora@v1/support.gguf", "rank": 8}],
    },
    "lora-two": {
        **SPECS["auto"],
        "adapters": [{"name": "support", "source": "hf://acme/tiny-lora@v1/support.gguf", "rank": 8},
                     {"name": "sql", "source": "hf://acme/tiny-sql-lora/adapters/sql.gguf", "rank": 8}],
    },
    "weights-gguf": {
        **SPECS["auto"],
        "weights": {"gguf": "hf://acme/tiny-ft@main/tiny-ft-F16.gguf"},
    },
}

#: Speculative decoding (issue 18), planned and rendered the same way: llama-3.2-3b-instruct with speculative mode
#: On, which the planner gives the catalog's draft for it (llama-3.2-1b-instruct's GGUF; the 1B of SPECS has none),
#: one kind per KV-cache setting as in SPECS. "draft": a 16-bit cache, so no draft cache flags. "draft-q8_0": the
#: planner's own choice again (a context whose 16-bit caches, the target's and the draft's, do not fit with f16
#: weights only), and the renderer gives the draft's cache the target's 8-bit type
#: (--spec-draft-type-k/-v q8_0, since the target's --cache-type-k/-v do not carry over). Kept apart from SPECS,
#: whose kinds are the 1B's.
SPECULATIVE_SPECS: dict[str, dict] = {
    "draft": {
        "model": "llama-3.2-3b-instruct", "runtime": "llamacpp", "contextLength": 4096, "memoryBudget": "12Gi",
        "slo": {"ttftP95": "10s", "tpotP95": "1s", "concurrency": 2},
        "speculative": {"mode": "On"},
    },
    "draft-q8_0": {
        "model": "llama-3.2-3b-instruct", "runtime": "llamacpp", "contextLength": 32768, "memoryBudget": "14Gi",
        "slo": {"ttftP95": "30s", "tpotP95": "2s", "concurrency": 2},
        "fallback": {"allowSmallerModels": False, "quantizations": ["f16"]},
        "speculative": {"mode": "On"},
    },
}

#: Every kind render_kind knows (the three dicts' keys do not overlap).
ALL_SPECS: dict[str, dict] = {**SPECS, **FINETUNE_SPECS, **SPECULATIVE_SPECS}
assert len(ALL_SPECS) == len(SPECS) + len(FINETUNE_SPECS) + len(SPECULATIVE_SPECS)


@dataclass(frozen=True)
class Rendered:
    spec: LlamaDeploymentSpec
    plan: ChosenPlan
    container: dict
    pod: dict

    @property
    def args(self) -> list[str]:
        return list(self.container["args"])

    def arg(self, flag: str) -> str:
        args = self.args
        return args[args.index(flag) + 1]

    @property
    def init_container(self) -> dict:
        (init,) = self.pod["initContainers"]
        return init


def render_kind(kind: str) -> Rendered:
    """Plan SPECS[kind] (or FINETUNE_SPECS[kind], SPECULATIVE_SPECS[kind]) on the CPU-only example cluster and
    render it, as the operator does."""
    return render_spec(ALL_SPECS[kind])


def render_spec(document: dict, cluster: str = "cpu-only.yaml") -> Rendered:
    """Plan a LlamaDeployment's spec on one of the example clusters and render it, as the operator does."""
    spec = parse_spec(document)
    nodes = cluster_nodes(cluster)
    result = planner.plan(spec, Inventory.from_manifests(nodes, []))
    assert result.chosen is not None, result.fallback_reason
    plan = result.chosen.to_chosen_plan()
    objects = render(OWNER, spec, plan)
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return Rendered(spec, plan, container, pod)


def adapter_paths(rendered: Rendered) -> list[str]:
    """Where the pod finds each of spec.adapters, in spec order (the fetched file or the claim's)."""
    local = pod_sources([a.source for a in rendered.spec.adapters]).local
    return [local[a.source] for a in rendered.spec.adapters]


def adapter_stand_ins(rendered: Rendered) -> dict[str, Path]:
    """Each adapter's path in the pod -> the tiny adapter file named like it (tiny_lora_gguf.ADAPTERS)."""
    return {path: tiny_lora_gguf(a.name) for a, path in zip(rendered.spec.adapters, adapter_paths(rendered))}


def draft_stand_in(rendered: Rendered, model: Path, name: str = "one-layer") -> Path | None:
    """The local file for the plan's draft model (None without one): a tiny draft of the tiny model `model`
    (tiny_draft_gguf.DRAFTS[name]; one-layer shares its vocabulary, so llama-server speculates with it)."""
    return tiny_draft_gguf(model, name) if rendered.plan.speculative is not None else None
