"""A plan that decodes with a draft model (status.plan.speculative, docs/speculative.md): the server's arguments,
from the pinned release's own facts (catalog/engines.yaml `speculative`, cited there).

* vLLM: one `--speculative-config` JSON object naming the method (`draft_model`: given, never guessed from the
  draft's name), the draft's checkpoint and the draft length. The draft's tensor-parallel size is left to vLLM,
  which takes the target's (the draft splits over the same GPUs, as the estimate assumes); vLLM downloads the
  draft into the same Hugging Face cache as the target.
* llama.cpp: `--spec-type draft-simple` (without it b11434 loads the draft and throws it away), the draft's GGUF
  file from its repository (`--spec-draft-hf` and `--spec-draft-model`, as `--hf-repo`/`--hf-file` give the
  target's, into the same cache), the draft length, every draft layer on the GPUs when the target's are, and the
  target's 8-bit KV cache type for the draft's cache too (the target's --cache-type-k/-v do not carry over).
"""
from __future__ import annotations

import json

from ..catalog import load_catalog
from ..engines import EngineRelease
from ..estimate import weights_bytes
from ..status import ChosenPlan


def draft_args(plan: ChosenPlan, rel: EngineRelease, gpu_layers: int) -> list[str]:
    """The arguments that make the server decode with the plan's draft; [] without one. `gpu_layers`: the layers
    the target's server puts on GPUs (llama.cpp), which the draft's follow."""
    s = plan.speculative
    if s is None:
        return []
    support = rel.speculative
    assert support is not None, f"{rel.title} does not draft: the planner never plans it"
    if plan.runtime == "vllm":
        config = {"method": support.method, "model": s.draftWeightsSource,
                  "num_speculative_tokens": s.numSpeculativeTokens}
        return [support.flags["config"], json.dumps(config, separators=(",", ":"))]
    org, name, file = s.draftWeightsSource.split("/", 2)  # a GGUF source is org/repo/file (Candidate)
    repo = f"{org}/{name}"
    flags = support.flags
    args = [flags["type"], support.method or "", flags["draftRepo"], repo, flags["draft"], file,
            flags["draftMax"], str(s.numSpeculativeTokens), flags["gpuLayers"], str(gpu_layers)]
    if plan.kvCacheDtype != "auto":
        args += [flags["cacheTypeK"], plan.kvCacheDtype, flags["cacheTypeV"], plan.kvCacheDtype]
    return args


def draft_weights_bytes(plan: ChosenPlan) -> int:
    """The draft's weights as downloaded (0 without a draft): the download space and the start-up time count
    them with the target's."""
    s = plan.speculative
    if s is None:
        return 0
    catalog = load_catalog()
    return weights_bytes(catalog.model(s.draftModel), catalog.quantizations[s.draftQuantization])
