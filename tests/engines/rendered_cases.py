"""The LlamaDeployments tests/engines runs, planned and rendered exactly as the operator does."""
from __future__ import annotations

from dataclasses import dataclass

from llama_operator import planner
from llama_operator.api import LlamaDeploymentSpec, parse_spec
from llama_operator.status import ChosenPlan
from llama_operator.inventory import Inventory
from llama_operator.render import Owner, render

from kit.examples import cluster_nodes

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


@dataclass(frozen=True)
class Rendered:
    spec: LlamaDeploymentSpec
    plan: ChosenPlan
    container: dict

    @property
    def args(self) -> list[str]:
        return list(self.container["args"])

    def arg(self, flag: str) -> str:
        args = self.args
        return args[args.index(flag) + 1]


def render_kind(kind: str) -> Rendered:
    """Plan SPECS[kind] on the CPU-only example cluster and render it, as the operator does."""
    spec = parse_spec(SPECS[kind])
    nodes = cluster_nodes("cpu-only.yaml")
    result = planner.plan(spec, Inventory.from_manifests(nodes, []))
    assert result.chosen is not None, result.fallback_reason
    plan = result.chosen.to_chosen_plan()
    objects = render(OWNER, spec, plan)
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return Rendered(spec, plan, container)
