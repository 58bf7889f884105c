"""The reconcile decision (llama_operator.reconcile.decide / decide_invalid), pass after pass.

Each test replays what the operator does: it feeds the status written by the previous pass back in
as `Observed.status`, with a fresh plan from the real planner on a small cluster, and checks what a
user would see: the phase and message, the variant in force, what gets (re)applied, pendingChange,
the conditions, and the Events (only on transitions: a resync must not spam).
"""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from llama_operator import planner
from llama_operator.fields import name_problems
from llama_operator.reconcile import Decision, ObjectIssue, Observed, decide, decide_invalid, decide_objects
from llama_operator.status import LlamaDeploymentStatus

T0 = datetime(2025, 1, 15, 10, 0, 0, tzinfo=timezone.utc)
DELAY = timedelta(minutes=2)
READY_1 = {"replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1}
ROLLING_1 = {"replicas": 1, "updatedReplicas": 0, "readyReplicas": 0}

# Llama 3.3 70B with a tight TPOT: on L40S + A10G only AWQ over 4x A10G meets it (a fallback);
# an 8x H100 node makes bf16 possible, and so does an 8x A100 node (another, different proposal).
SPEC_70B = {"model": "llama-3.3-70b-instruct", "memoryBudget": "320Gi", "contextLength": 16384,
            "slo": {"ttftP95": "5s", "tpotP95": "30ms", "promptTokens": 1024, "concurrency": 4}}


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def observe(status: LlamaDeploymentStatus | None = None, *, generation: int = 1, deployment: dict | None = None,
            now: datetime = T0, delay: timedelta = DELAY) -> Observed:
    return Observed(name="chat", namespace="team-a", generation=generation,
                    status=status if status is not None else LlamaDeploymentStatus(),
                    deployment_status=deployment, now=now, upgrade_delay=delay)


def reasons(decision: Decision) -> list[str]:
    return [reason for _, reason, _ in decision.events]


def condition(status: LlamaDeploymentStatus, ctype: str):
    found = [c for c in status.conditions if c.type == ctype]
    assert len(found) == 1, status.conditions
    return found[0]


@pytest.fixture
def clusters(make_node, make_inventory):
    l40s = make_node("l40s", "NVIDIA-L40S", 2, cpu="64", memory="512Gi")
    a10g = make_node("a10g", "NVIDIA-A10G", 4, cpu="48", memory="192Gi")
    h100 = make_node("h100", "NVIDIA-H100-80GB-HBM3", 8, cpu="192", memory="2000Gi")
    a100 = make_node("a100", "NVIDIA-A100-SXM4-80GB", 8, cpu="96", memory="1000Gi")
    return {
        "small": make_inventory(l40s, a10g),
        "with-h100": make_inventory(l40s, a10g, h100),
        "with-a100": make_inventory(l40s, a10g, a100),
        "l40s-only": make_inventory(l40s),
        "empty": make_inventory(),
    }


def plan_on(spec, inventory):
    return planner.plan(spec, inventory)


def check(spec, inventory, status: LlamaDeploymentStatus):
    """What the handler passes as current_problems."""
    return planner.check_choice(spec, inventory, status.plan) if status.plan is not None else None


def converge(spec, inventory, *, now=T0) -> LlamaDeploymentStatus:
    """First pass, then the Deployment reports ready: the status of a deployment serving its plan."""
    first = decide(observe(now=now), spec, plan_on(spec, inventory), None)
    ready = decide(observe(first.status, deployment=READY_1, now=now), spec, plan_on(spec, inventory),
                   check(spec, inventory, first.status))
    assert ready.status.phase == "Ready"
    return ready.status


# --- first plan, then ready ------------------------------------------------------------------------------

def test_first_plan_is_applied_with_a_planned_event_and_pending(make_spec, clusters):
    spec = make_spec()
    plan = plan_on(spec, clusters["small"])
    d = decide(observe(), spec, plan, None)

    assert d.apply is not None and d.apply.same_choice(plan.chosen.to_chosen_plan())
    assert reasons(d) == ["Planned"] and d.events[0][0] == "Normal"
    assert plan.chosen.describe() in d.events[0][2]
    s = d.status
    assert s.phase == "Pending" and s.observedGeneration == 1
    assert s.plan == d.apply and s.variant == f"{d.apply.model}/{d.apply.quantization}" and s.runtime == "vllm"
    assert s.endpoint == "http://chat.team-a.svc:8000/v1"
    assert s.ready == "0/1" and s.readyReplicas == 0
    assert condition(s, "Ready").status == "False"
    assert condition(s, "PlanFeasible").status == "True"
    assert condition(s, "Progressing").status == "True" and condition(s, "Progressing").reason == "RollingOut"
    assert s.pendingChange is None
    assert d.outcome == "requested"


def test_the_planners_notes_reach_status(make_spec, make_node, make_inventory):
    # A GPU product the catalog lacks is planned on conservatively, and status says so: never silently.
    spec = make_spec()
    inventory = make_inventory(make_node("z", "NVIDIA-Z9000", 1, memory_mib=96 * 1024, compute="9.0"))
    d = decide(observe(), spec, planner.plan(spec, inventory), None)
    assert d.status.plan.gpuProduct == "NVIDIA-Z9000"
    assert any("NVIDIA-Z9000 is not in the catalog" in n and "slowest catalog GPU" in n for n in d.status.notes)


def test_the_first_pass_writes_the_status_the_created_deployment_keeps(make_spec, clusters):
    """The pass that creates the Deployment describes it as created (empty status), so the pass woken by its
    appearance has nothing new to write: one status write per new LlamaDeployment, not two."""
    spec = make_spec()
    inv = clusters["small"]
    first = decide(observe(), spec, plan_on(spec, inv), None)
    created = decide(observe(first.status, deployment={}), spec, plan_on(spec, inv), check(spec, inv, first.status))
    assert created.status == first.status and created.events == []
    assert first.status.message == "Waiting for the first replica to be scheduled"


def test_ready_replicas_of_an_older_spec_do_not_make_it_ready(make_spec, clusters):
    """Same plan, new render (a longer context): the ready replica still runs the old arguments."""
    spec = make_spec()
    inv = clusters["small"]
    ready = converge(spec, inv)
    changed = make_spec(contextLength=16384)
    obs = replace(observe(ready, generation=2, deployment=READY_1), deployment_runs_plan=False)
    rolling = decide(obs, changed, plan_on(changed, inv), check(changed, inv, ready))
    assert rolling.apply.same_choice(ready.plan)
    assert rolling.status.phase == "Deploying" and "1/1 replicas ready" in rolling.status.message
    assert condition(rolling.status, "Progressing").reason == "RollingOut"


def test_a_deployment_already_running_the_plan_is_ready_on_the_first_pass(make_spec, clusters):
    """An operator restarted after creating the workload, before writing status: nothing to roll out."""
    spec = make_spec()
    inv = clusters["small"]
    adopted = decide(replace(observe(deployment=READY_1), deployment_runs_plan=True), spec, plan_on(spec, inv), None)
    assert adopted.status.phase == "Ready" and reasons(adopted) == ["Planned", "Ready"]


def test_a_fallback_plan_says_so(make_spec, clusters):
    spec = make_spec(**SPEC_70B)
    d = decide(observe(), spec, plan_on(spec, clusters["small"]), None)
    assert d.apply.quantization == "awq-int4" and d.apply.gpuProduct == "NVIDIA-A10G"
    assert reasons(d) == ["Planned"]  # one Event per decision; it says why this is a fallback
    why = plan_on(spec, clusters["small"]).fallback_reason.split(" because ", 1)[1]
    assert d.events[0][2].endswith(f", a fallback because {why}")
    assert d.status.fallback.inForce and d.status.fallback.requestedModel == "llama-3.3-70b-instruct"
    assert "bf16" in d.status.fallback.reason  # why the better rungs did not work
    fb = condition(d.status, "FallbackApplied")
    assert fb.status == "True" and fb.reason == "Quantized"
    assert d.outcome == "fallback"


def first_then(spec, inv, deployment: dict):
    """The first pass, then one 5 s later that sees the Deployment's status `deployment`."""
    first = decide(observe(), spec, plan_on(spec, inv), None)
    return first, decide(observe(first.status, deployment=deployment, now=T0 + timedelta(seconds=5)), spec,
                         plan_on(spec, inv), check(spec, inv, first.status))


def test_ready_deployment_makes_the_phase_ready_once(make_spec, clusters):
    spec = make_spec()
    inv = clusters["small"]
    first, rolling = first_then(spec, inv, ROLLING_1)
    assert rolling.status.phase == "Pending" and rolling.events == []

    ready = decide(observe(rolling.status, deployment=READY_1, now=T0 + timedelta(seconds=60)), spec,
                   plan_on(spec, inv), check(spec, inv, rolling.status))
    assert ready.status.phase == "Ready" and reasons(ready) == ["Ready"]
    assert ready.apply.same_choice(first.apply)  # same workload, nothing to roll
    assert ready.status.ready == "1/1" and ready.status.readyReplicas == 1
    assert condition(ready.status, "Ready").status == "True"
    assert condition(ready.status, "Progressing").status == "False"
    assert ready.status.message.startswith("Serving ")

    again = decide(observe(ready.status, deployment=READY_1, now=T0 + timedelta(minutes=10)), spec,
                   plan_on(spec, inv), check(spec, inv, ready.status))
    assert again.events == [] and again.status == ready.status  # a resync writes nothing new


def test_conditions_keep_their_transition_time_while_unchanged(make_spec, clusters):
    spec = make_spec()
    inv = clusters["small"]
    first = decide(observe(), spec, plan_on(spec, inv), None)
    t1 = T0 + timedelta(seconds=30)
    second = decide(observe(first.status, deployment=ROLLING_1, now=t1), spec, plan_on(spec, inv),
                    check(spec, inv, first.status))
    for c in second.status.conditions:
        assert c.lastTransitionTime == iso(T0), c
    t2 = T0 + timedelta(seconds=90)
    ready = decide(observe(second.status, deployment=READY_1, now=t2), spec, plan_on(spec, inv),
                   check(spec, inv, second.status))
    times = {c.type: c.lastTransitionTime for c in ready.status.conditions}
    assert times["Ready"] == iso(t2) and times["Progressing"] == iso(t2)  # these flipped
    assert times["PlanFeasible"] == iso(T0) and times["FallbackApplied"] == iso(T0)  # these did not
    later = decide(observe(ready.status, deployment=READY_1, now=T0 + timedelta(hours=1)), spec, plan_on(spec, inv),
                   check(spec, inv, ready.status))
    assert {c.type: c.lastTransitionTime for c in later.status.conditions} == times


# --- no feasible plan --------------------------------------------------------------------------------------

def test_infeasible_is_unschedulable_with_one_warning_and_no_spam(make_spec, clusters):
    spec = make_spec(model="llama-3.1-405b-instruct", memoryBudget="16Gi", fallback={"allowSmallerModels": False})
    inv = clusters["small"]
    plan = plan_on(spec, inv)
    assert plan.chosen is None
    d = decide(observe(), spec, plan, None)
    assert d.apply is None  # nothing to run
    assert d.status.phase == "Unschedulable" and d.outcome == "infeasible"
    assert d.events == [("Warning", "Unschedulable", f"No feasible plan: {plan.fallback_reason}")]
    assert "memory budget" in d.status.message  # the reasons, not just the verdict
    assert d.status.rejected and all(r.reasons for r in d.status.rejected)
    feasible = condition(d.status, "PlanFeasible")
    assert feasible.status == "False" and feasible.reason == "NoFeasiblePlan"

    again = decide(observe(d.status, now=T0 + timedelta(minutes=5)), spec, plan_on(spec, inv), None)
    assert again.events == []
    assert again.status == d.status


def test_infeasible_after_a_cluster_change_keeps_what_runs(make_spec, clusters):
    # (no draft either: on the L40S pair an AWQ 70B with a 1B draft would meet it)
    spec = make_spec(**SPEC_70B, fallback={"allowSmallerModels": False}, speculative={"mode": "Off"})
    running = converge(spec, clusters["small"])
    # The A10G node is cordoned or gone and nothing else can serve the SLO.
    inv = clusters["l40s-only"]
    plan = plan_on(spec, inv)
    assert plan.chosen is None
    d = decide(observe(running, deployment=READY_1, now=T0 + timedelta(minutes=1)), spec, plan,
               check(spec, inv, running))
    assert d.apply is not None and d.apply == running.plan  # the workload is left as it is
    assert d.status.plan == running.plan and d.status.variant == running.variant
    assert d.status.phase == "Unschedulable" and reasons(d) == ["Unschedulable"]
    assert d.status.message.startswith(f"Still serving {running.variant} on 1 replica(s)")

    again = decide(observe(d.status, deployment=READY_1, now=T0 + timedelta(minutes=2)), spec, plan_on(spec, inv),
                   check(spec, inv, d.status))
    assert again.events == [] and again.apply == running.plan and again.status == d.status


# --- spec changes -----------------------------------------------------------------------------------------

def test_spec_change_replans_at_once(make_spec, clusters):
    before = make_spec()
    inv = clusters["small"]
    running = converge(before, inv)
    after = make_spec(model="llama-3.3-70b-instruct", memoryBudget="320Gi")  # generation 2
    plan = plan_on(after, inv)
    d = decide(observe(running, generation=2, deployment=READY_1, now=T0 + timedelta(seconds=1)), after, plan,
               check(after, inv, running))
    assert d.apply is not None and d.apply.model == "llama-3.3-70b-instruct"
    assert not d.apply.same_choice(running.plan)
    assert "Replanned" in reasons(d) and d.events[0][0] == "Normal" and "Spec changed" in d.events[0][2]
    assert d.status.pendingChange is None  # no hysteresis for what the user asked for
    assert d.status.observedGeneration == 2 and d.status.variant == d.apply.variant
    assert d.status.phase == "Deploying"  # the old pods still serve while the new variant rolls out
    assert {c.observedGeneration for c in d.status.conditions} == {2}


def test_spec_change_with_the_same_choice_reapplies_without_an_event(make_spec, clusters):
    inv = clusters["small"]
    running = converge(make_spec(), inv)
    after = make_spec(contextLength=4096)
    plan = plan_on(after, inv)
    assert plan.chosen.to_chosen_plan().same_choice(running.plan)
    d = decide(observe(running, generation=2, deployment=READY_1), after, plan, check(after, inv, running))
    assert d.apply is not None  # re-rendered: the new contextLength reaches --max-model-len
    assert d.events == [] and d.status.observedGeneration == 2


# --- cluster changes: hysteresis ---------------------------------------------------------------------------

def test_better_plan_waits_for_the_upgrade_delay(make_spec, clusters):
    spec = make_spec(**SPEC_70B)
    running = converge(spec, clusters["small"])
    inv = clusters["with-h100"]
    plan = plan_on(spec, inv)
    better = plan.chosen.to_chosen_plan()
    assert (better.quantization, better.gpuProduct) == ("bf16", "NVIDIA-H100-80GB-HBM3")
    assert check(spec, inv, running) == []  # what runs still works

    t1 = T0 + timedelta(minutes=1)
    d1 = decide(observe(running, deployment=READY_1, now=t1), spec, plan, check(spec, inv, running))
    assert d1.apply == running.plan  # not yet
    assert reasons(d1) == ["UpgradePending"]
    pending = d1.status.pendingChange
    assert pending is not None and pending.plan.same_choice(better) and pending.since == iso(t1)
    assert iso(t1 + DELAY) in pending.reason
    assert d1.status.phase == "Ready" and d1.status.variant == running.variant
    assert pending.reason in d1.status.message
    progressing = condition(d1.status, "Progressing")
    assert progressing.status == "True" and progressing.reason == "UpgradePending"

    # Resyncs before the delay has passed: no new event, the clock is not reset.
    d2 = decide(observe(d1.status, deployment=READY_1, now=t1 + DELAY - timedelta(seconds=1)), spec,
                plan_on(spec, inv), check(spec, inv, d1.status))
    assert d2.events == [] and d2.apply == running.plan
    assert d2.status.pendingChange.since == iso(t1)

    # The same proposal, continuously, for the whole delay: move.
    d3 = decide(observe(d2.status, deployment=READY_1, now=t1 + DELAY), spec, plan_on(spec, inv),
                check(spec, inv, d2.status))
    assert d3.apply is not None and d3.apply.same_choice(better)
    assert reasons(d3) == ["Upgraded"] and d3.events[0][0] == "Normal"
    assert d3.status.pendingChange is None and d3.status.variant == "llama-3.3-70b-instruct/bf16"
    assert d3.status.phase == "Deploying"
    assert not d3.status.fallback.inForce and condition(d3.status, "FallbackApplied").status == "False"


def test_a_different_proposal_restarts_the_clock(make_spec, clusters):
    spec = make_spec(**SPEC_70B)
    running = converge(spec, clusters["small"])
    h100 = clusters["with-h100"]
    d1 = decide(observe(running, deployment=READY_1, now=T0), spec, plan_on(spec, h100), check(spec, h100, running))
    assert d1.status.pendingChange.plan.gpuProduct == "NVIDIA-H100-80GB-HBM3"

    # The H100 node went away and an A100 node came: another better plan, proposed from now on.
    a100 = clusters["with-a100"]
    plan = plan_on(spec, a100)
    assert plan.chosen.pool.gpu.product == "NVIDIA-A100-SXM4-80GB"
    t = T0 + DELAY + timedelta(seconds=10)  # the first proposal would have been due
    d2 = decide(observe(d1.status, deployment=READY_1, now=t), spec, plan, check(spec, a100, d1.status))
    assert d2.apply == running.plan  # not moved
    assert reasons(d2) == ["UpgradePending"]
    assert d2.status.pendingChange.plan.gpuProduct == "NVIDIA-A100-SXM4-80GB"
    assert d2.status.pendingChange.since == iso(t)

    d3 = decide(observe(d2.status, deployment=READY_1, now=t + DELAY), spec, plan_on(spec, a100),
                check(spec, a100, d2.status))
    assert d3.apply.gpuProduct == "NVIDIA-A100-SXM4-80GB" and reasons(d3) == ["Upgraded"]


def test_a_withdrawn_proposal_clears_pending(make_spec, clusters):
    spec = make_spec(**SPEC_70B)
    running = converge(spec, clusters["small"])
    h100 = clusters["with-h100"]
    d1 = decide(observe(running, deployment=READY_1, now=T0), spec, plan_on(spec, h100), check(spec, h100, running))
    assert d1.status.pendingChange is not None
    small = clusters["small"]  # the H100 node left again before the delay
    d2 = decide(observe(d1.status, deployment=READY_1, now=T0 + timedelta(seconds=30)), spec, plan_on(spec, small),
                check(spec, small, d1.status))
    assert d2.status.pendingChange is None and d2.apply.same_choice(running.plan)
    assert d2.status.phase == "Ready" and condition(d2.status, "Progressing").status == "False"


def test_losing_the_hardware_in_force_moves_at_once_with_a_warning(make_spec, clusters):
    spec = make_spec(**SPEC_70B)
    on_h100 = converge(spec, clusters["with-h100"])
    assert on_h100.plan.gpuProduct == "NVIDIA-H100-80GB-HBM3"
    inv = clusters["small"]  # the H100 node is gone
    problems = check(spec, inv, on_h100)
    assert problems  # non-empty: the plan in force has lost its hardware
    d = decide(observe(on_h100, deployment=READY_1, now=T0 + timedelta(seconds=1)), spec, plan_on(spec, inv), problems)
    assert d.apply is not None and d.apply.gpuProduct == "NVIDIA-A10G"  # no waiting for the upgrade delay
    assert d.status.pendingChange is None
    assert d.events[0][:2] == ("Warning", "Replanned") and problems[0] in d.events[0][2]
    assert reasons(d) == ["Replanned"] and "a fallback because " in d.events[0][2]
    assert d.status.variant == "llama-3.3-70b-instruct/awq-int4" and d.status.phase == "Deploying"


# --- invalid specs -----------------------------------------------------------------------------------------

def test_invalid_spec_keeps_the_workload_and_warns_once_per_generation(make_spec, clusters):
    spec = make_spec()
    running = converge(spec, clusters["small"])
    problems = ["spec.slo.ttftP95: 'fast' is not a duration; write a number with a unit, e.g. 500ms, 1.5s or 2m"]

    d = decide_invalid(observe(running, generation=2, deployment=READY_1, now=T0 + timedelta(seconds=5)), problems)
    assert d.apply is None  # the operator leaves the workload alone
    assert d.status.phase == "Invalid" and d.outcome == "invalid"
    assert d.status.message == problems[0]
    assert d.events == [("Warning", "InvalidSpec", problems[0])]
    assert d.status.plan == running.plan and d.status.variant == running.variant  # still what runs
    assert d.status.observedGeneration == 2
    assert condition(d.status, "PlanFeasible").reason == "InvalidSpec"
    assert condition(d.status, "Ready").status == "True"  # the old model still answers

    again = decide_invalid(observe(d.status, generation=2, deployment=READY_1, now=T0 + timedelta(minutes=5)),
                           problems)
    assert again.events == [] and again.status == d.status

    edited = decide_invalid(observe(again.status, generation=3, deployment=READY_1, now=T0 + timedelta(minutes=6)),
                            ["spec.memoryBudget: required; add it"])
    assert reasons(edited) == ["InvalidSpec"] and edited.status.observedGeneration == 3

    fixed = make_spec(contextLength=4096)  # generation 4: valid again, planned at once
    inv = clusters["small"]
    back = decide(observe(edited.status, generation=4, deployment=READY_1, now=T0 + timedelta(minutes=7)), fixed,
                  plan_on(fixed, inv), check(fixed, inv, edited.status))
    assert back.status.phase == "Ready" and back.apply is not None and back.status.observedGeneration == 4
    assert back.events == [("Normal", "Ready", back.status.message)]


def test_not_ready_while_the_old_revision_still_serves(make_spec, clusters):
    inv = clusters["small"]
    running = converge(make_spec(), inv)
    after = make_spec(model="llama-3.3-70b-instruct", memoryBudget="320Gi")
    replanned = decide(observe(running, generation=2, deployment=READY_1), after, plan_on(after, inv),
                       check(after, inv, running))
    assert replanned.status.phase == "Deploying"
    # The Deployment controller created the new pod (not schedulable yet); the old one still serves.
    midway = {"replicas": 2, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1}
    d = decide(observe(replanned.status, generation=2, deployment=midway, now=T0 + timedelta(seconds=30)), after,
               plan_on(after, inv), check(after, inv, replanned.status))
    assert d.status.phase != "Ready", d.status.message


# --- the Deployment's controller cannot create pods (admission, quota) ------------------------------------

PSA = ('pods "chat-7d4b9c-x2x9z" is forbidden: violates PodSecurity "restricted:latest": allowPrivilegeEscalation '
       '!= false (container "vllm" must set securityContext.allowPrivilegeEscalation=false)')
REFUSED_1 = {"replicas": 0, "updatedReplicas": 0, "readyReplicas": 0, "observedGeneration": 1, "conditions": [
    {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"},
    {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": PSA}]}


def test_pods_refused_by_admission_are_degraded_with_the_controllers_message_once(make_spec, clusters):
    spec = make_spec()
    inv = clusters["small"]
    _, refused = first_then(spec, inv, REFUSED_1)
    s = refused.status
    assert s.phase == "Degraded" and PSA in s.message and s.message.startswith("0/1 replicas ready")
    assert reasons(refused) == ["ReplicaFailure"] and refused.events[0][0] == "Warning"
    assert PSA in refused.events[0][2]
    assert condition(s, "Ready").status == "False" and condition(s, "Ready").reason == "ReplicaFailure"
    assert PSA in condition(s, "Ready").message
    progressing = condition(s, "Progressing")
    assert progressing.status == "False" and progressing.reason == "ReplicaFailure" and progressing.message == PSA

    # Resyncs: the same failure is said once.
    again = decide(observe(s, deployment=REFUSED_1, now=T0 + timedelta(minutes=5)), spec, plan_on(spec, inv),
                   check(spec, inv, s))
    assert again.events == [] and again.status == s

    # Another refusal (say the namespace's policy changed): said again.
    other = dict(REFUSED_1, conditions=[dict(REFUSED_1["conditions"][1], message="exceeded quota: gpu-quota")])
    changed = decide(observe(s, deployment=other, now=T0 + timedelta(minutes=6)), spec, plan_on(spec, inv),
                     check(spec, inv, s))
    assert reasons(changed) == ["ReplicaFailure"] and "exceeded quota" in changed.status.message

    # Fixed (the pods are admitted and ready): Ready, and the failure is gone from the conditions.
    fixed = decide(observe(changed.status, deployment=READY_1, now=T0 + timedelta(minutes=7)), spec,
                   plan_on(spec, inv), check(spec, inv, changed.status))
    assert fixed.status.phase == "Ready" and reasons(fixed) == ["Ready"]
    assert all(c.reason != "ReplicaFailure" for c in fixed.status.conditions)


def test_a_ready_deployment_whose_new_pods_are_refused_warns_once_not_twice(make_spec, clusters):
    """From Ready, a rollout whose pods admission refuses: one Warning (ReplicaFailure), not Degraded as well."""
    spec = make_spec()
    inv = clusters["small"]
    ready = converge(spec, inv)
    stuck = {**READY_1, "updatedReplicas": 0, "conditions": REFUSED_1["conditions"]}
    d = decide(replace(observe(ready, generation=2, deployment=stuck), deployment_runs_plan=False),
               make_spec(contextLength=16384), plan_on(make_spec(contextLength=16384), inv), check(spec, inv, ready))
    assert d.status.phase == "Degraded" and PSA in d.status.message
    assert reasons(d) == ["ReplicaFailure"]
    assert condition(d.status, "Ready").status == "True"  # the old revision still serves


# --- objects that could not be written: conflicts, refusals --------------------------------------------------

CONFLICT_MSG = ("Service team-a/chat exists and is not owned by this LlamaDeployment (it has no controller); the "
                "operator leaves it as it is. Rename the LlamaDeployment or remove the Service")


def test_an_object_held_by_someone_else_is_a_conflict_said_once(make_spec, clusters):
    spec = make_spec()
    inv = clusters["small"]
    first = decide(observe(), spec, plan_on(spec, inv), None)
    d = decide_objects(observe(), first, [ObjectIssue("conflict", CONFLICT_MSG)])
    assert d.status.phase == "Degraded" and d.status.message == CONFLICT_MSG
    assert reasons(d) == ["Planned", "OwnershipConflict"] and d.events[1][0] == "Warning"
    ready = condition(d.status, "Ready")
    assert ready.status == "False" and ready.reason == "OwnershipConflict" and "Rename" in ready.message
    assert d.apply is not None and d.status.plan is not None  # the plan stands; it runs once the name is free

    # The next pass finds the same conflict (and a Deployment now ready): nothing new to say.
    later = decide(observe(d.status, deployment=READY_1, now=T0 + timedelta(minutes=1)), spec, plan_on(spec, inv),
                   check(spec, inv, d.status))
    assert "Ready" in reasons(later)  # what decide alone would say...
    again = decide_objects(observe(d.status, deployment=READY_1, now=T0 + timedelta(minutes=1)), later,
                           [ObjectIssue("conflict", CONFLICT_MSG)])
    assert again.events == [] and again.status.phase == "Degraded"  # ...is not said while the conflict holds
    assert condition(again.status, "Ready").lastTransitionTime == iso(T0)
    # An object left for the garbage collector appearing beside it is no new trouble to warn about.
    beside = decide_objects(observe(again.status, deployment=READY_1, now=T0 + timedelta(minutes=1)), later,
                            [ObjectIssue("conflict", CONFLICT_MSG), ObjectIssue("superseded", "Service waits")])
    assert beside.events == [] and "Service waits" in beside.status.message

    # Resolved (the Service was removed, the operator made its own): Ready, said once.
    resolved = decide(observe(again.status, deployment=READY_1, now=T0 + timedelta(minutes=2)), spec,
                      plan_on(spec, inv), check(spec, inv, again.status))
    assert resolved.status.phase == "Ready" and reasons(resolved) == ["Ready"]


def test_a_refused_object_makes_it_invalid_with_the_servers_message_once(make_spec, clusters):
    spec = make_spec()
    inv = clusters["small"]
    message = ('the API server refused Deployment team-a/chat: Deployment.apps "chat" is invalid: '
               'spec.template.spec.tolerations[1].key: Invalid value: "bad key": name part must consist of ...')
    first = decide(observe(), spec, plan_on(spec, inv), None)
    d = decide_objects(observe(), first, [ObjectIssue("refused", message),
                                          ObjectIssue("conflict", CONFLICT_MSG)])
    assert d.status.phase == "Invalid" and d.status.message.startswith(message) and CONFLICT_MSG in d.status.message
    assert reasons(d) == ["Planned", "ObjectRefused"]  # one Warning for both
    assert condition(d.status, "Ready").reason == "ObjectRefused"
    again = decide_objects(observe(d.status), decide(observe(d.status), spec, plan_on(spec, inv),
                                                     check(spec, inv, d.status)),
                           [ObjectIssue("refused", message), ObjectIssue("conflict", CONFLICT_MSG)])
    assert again.events == [] and again.status == d.status


def test_an_object_left_by_a_deleted_predecessor_is_waited_for_without_a_warning(make_spec, clusters):
    spec = make_spec()
    first = decide(observe(), spec, plan_on(spec, clusters["small"]), None)
    d = decide_objects(observe(), first, [ObjectIssue("superseded", "PersistentVolumeClaim team-a/chat-model-cache "
                                                                    "belongs to a deleted LlamaDeployment ...")])
    assert d.status.phase == "Pending" and reasons(d) == ["Planned"]
    assert condition(d.status, "Progressing").reason == "WaitingForGarbageCollection"


@pytest.mark.parametrize("name, ok", [
    ("chat", True), ("a", True), ("llama-3-1-8b", True), ("a" * 63, True),
    ("a" * 64, False), ("my.chat", False), ("1chat", False), ("Chat", False), ("chat-", False), ("-chat", False),
])
def test_a_name_the_objects_cannot_have_is_invalid(name, ok):
    problems = name_problems(name)
    assert (problems == []) == ok
    if not ok:
        assert problems[0].startswith("metadata.name: ") and "Service" in problems[0]
        d = decide_invalid(observe(), problems)
        assert d.status.phase == "Invalid" and d.apply is None and reasons(d) == ["InvalidSpec"]


# --- status.adapters: each adapter's state and how a request uses it ----------------------------------------

VLLM_ADAPTERS = [{"name": "support", "source": "hf://acme/support-lora@v2"},
                 {"name": "sql", "source": "pvc://loras/sql"}]
GGUF_ADAPTERS = [{"name": "support", "source": "hf://acme/support-lora/support-F16.gguf"},
                 {"name": "sql", "source": "pvc://loras/sql-F16.gguf"}]


def adapter_states(status: LlamaDeploymentStatus) -> list[tuple[str, str, str | None]]:
    return [(a.name, a.state, a.call) for a in status.adapters]


def test_vllm_adapters_load_with_the_rollout_and_are_called_by_their_names(make_spec, clusters):
    spec = make_spec(adapters=VLLM_ADAPTERS)
    first, rolling = first_then(spec, clusters["small"], ROLLING_1)
    assert first.apply.runtime == "vllm"
    for d in (first, rolling):
        assert adapter_states(d.status) == [("support", "Loading", '"model": "support"'),
                                            ("sql", "Loading", '"model": "sql"')]
        assert d.status.adapterCount == 2
    assert [a.source for a in first.status.adapters] == [a["source"] for a in VLLM_ADAPTERS]

    ready = converge(spec, clusters["small"])
    assert [a.state for a in ready.adapters] == ["Ready", "Ready"] and ready.adapterCount == 2


def test_adapters_are_loading_while_pods_of_the_plan_before_them_still_serve(make_spec, clusters):
    inv = clusters["small"]
    running = converge(make_spec(), inv)
    spec = make_spec(adapters=VLLM_ADAPTERS)
    midway = {"replicas": 2, "updatedReplicas": 1, "readyReplicas": 2, "availableReplicas": 2}
    d = decide(observe(running, generation=2, deployment=midway), spec, plan_on(spec, inv), check(spec, inv, running))
    assert [a.state for a in d.status.adapters] == ["Loading", "Loading"]  # a request may reach an old pod


def test_adapters_without_a_feasible_plan_are_pending_without_a_call(make_spec, clusters):
    spec = make_spec(adapters=VLLM_ADAPTERS)
    d = decide(observe(), spec, plan_on(spec, clusters["empty"]), None)
    assert d.status.phase == "Unschedulable"
    assert adapter_states(d.status) == [("support", "Pending", None), ("sql", "Pending", None)]
    assert d.status.adapterCount == 2


def test_one_llamacpp_adapter_applies_to_every_request(make_spec, clusters):
    spec = make_spec(runtime="llamacpp", adapters=GGUF_ADAPTERS[:1])
    d = decide(observe(), spec, plan_on(spec, clusters["small"]), None)
    assert d.apply.runtime == "llamacpp"
    assert adapter_states(d.status) == [("support", "Loading", '"model": "chat" (applied to every request)')]
    assert d.status.adapterCount == 1


def test_several_llamacpp_adapters_are_picked_by_their_index(make_spec, clusters):
    spec = make_spec(runtime="llamacpp", adapters=GGUF_ADAPTERS)
    ready = converge(spec, clusters["small"])
    assert ready.plan.runtime == "llamacpp"
    assert adapter_states(ready) == [("support", "Ready", '"model": "chat", "lora": [{"id": 0, "scale": 1.0}]'),
                                     ("sql", "Ready", '"model": "chat", "lora": [{"id": 1, "scale": 1.0}]')]


def test_a_spec_without_adapters_writes_the_status_it_always_did(make_spec, clusters):
    """No adapters: the keys stay null, which the status write drops, so no existing object is rewritten."""
    ready = converge(make_spec(), clusters["small"])
    assert ready.adapters is None and ready.adapterCount is None
    dumped = ready.model_dump(mode="json")
    assert dumped["adapters"] is None and dumped["adapterCount"] is None


def test_an_invalid_spec_keeps_the_adapters_that_still_run(make_spec, clusters):
    running = converge(make_spec(adapters=VLLM_ADAPTERS), clusters["small"])
    d = decide_invalid(observe(running, generation=2, deployment=READY_1), ["spec.adapters[1].name: taken"])
    assert d.status.adapters == running.adapters and d.status.adapterCount == 2
