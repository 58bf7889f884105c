"""A plan in force that the catalog no longer knows (an operator upgrade dropped its quantization or its
model): reconcile keeps deciding, without a KeyError, and says so."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from llama_operator import planner
from llama_operator.status import LlamaDeploymentStatus
from llama_operator.reconcile import Observed, decide, fallback_kind

T0 = datetime(2025, 1, 15, 10, 0, 0, tzinfo=timezone.utc)
READY_1 = {"replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1}


def observe(status: LlamaDeploymentStatus, now: datetime) -> Observed:
    return Observed(name="chat", namespace="team-a", generation=1, status=status, deployment_status=READY_1,
                    now=now, upgrade_delay=timedelta(minutes=2))


def running_plan(make_spec, make_node, make_inventory):
    spec = make_spec(fallback={"allowSmallerModels": False})
    inv = make_inventory(make_node("l4", "NVIDIA-L4", 1))
    first = decide(observe(LlamaDeploymentStatus(), T0), spec, planner.plan(spec, inv), None)
    assert first.apply is not None
    return spec, first.status


def test_fallback_kind_of_a_quantization_the_catalog_dropped(make_spec, make_node, make_inventory):
    spec, status = running_plan(make_spec, make_node, make_inventory)
    gone = status.plan.model_copy(update={"quantization": "q1_dropped"})
    assert fallback_kind(spec, gone) == "NotInCatalog"
    # the other answers are unchanged
    assert fallback_kind(spec, status.plan.model_copy(update={"model": "llama-3.2-1b-instruct"})) == "SmallerModel"
    assert fallback_kind(spec, status.plan.model_copy(update={"quantization": "bf16", "kvCacheDtype": "auto"})) is None
    assert fallback_kind(spec, status.plan.model_copy(update={"quantization": "fp8"})) == "Quantized"


def test_decide_keeps_an_off_catalog_plan_in_force_while_nothing_fits(make_spec, make_node, make_inventory):
    spec, status = running_plan(make_spec, make_node, make_inventory)
    status = status.model_copy(update={"plan": status.plan.model_copy(update={"quantization": "q1_dropped"})})
    empty = make_inventory()
    plan = planner.plan(spec, empty)
    assert plan.chosen is None
    problems = planner.check_choice(spec, empty, status.plan)
    assert problems == [f"{spec.model} q1_dropped is no longer in the catalog"]
    d = decide(observe(status, T0 + timedelta(minutes=1)), spec, plan, problems)  # raised KeyError before
    assert d.apply == status.plan and d.status.phase == "Unschedulable"
    (fallback,) = [c for c in d.status.conditions if c.type == "FallbackApplied"]
    assert fallback.reason == "NotInCatalog"
