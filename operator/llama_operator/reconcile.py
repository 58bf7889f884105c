"""The reconcile decision: from what the operator sees, what to run, what status to write, what to say.

Pure: the kopf handlers gather the inputs (the object, a fresh plan, whether the plan in force still
fits, the owned Deployment's status, the time) and carry out the Decision. Rules:

* A spec change re-plans at once. A cluster change re-plans at once only when the plan in force has
  lost its hardware; a better plan (a bigger GPU joined) waits until it has been proposed continuously
  for the upgrade delay (hysteresis), so a flapping node does not bounce a model between variants.
* No feasible plan keeps whatever runs and says Unschedulable, with the reasons.
* An invalid spec keeps whatever runs and says Invalid, naming the field; it is not retried in a loop.
* Events only on transitions, so a resync writes nothing new; one Event per decision (a fallback is
  said in the message of the decision that applies it, and in the FallbackApplied condition).
* A Deployment whose controller cannot create pods (its ReplicaFailure condition: an admission
  refusal, a quota) makes the phase Degraded with the controller's message, and one Warning Event.
* What writing the objects came to can overrule the phase (`decide_objects`): an object of the same
  name the LlamaDeployment does not own is a conflict (Degraded, Warning OwnershipConflict), an object
  the API server refuses makes it Invalid (Warning ObjectRefused), each said once, not every pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from .api import LlamaDeploymentSpec
from .catalog import load_catalog
from .planner import STATUS_REJECTED_LIMIT, Plan, rank
from .status import (
    ChosenPlan,
    Condition,
    FallbackStatus,
    LlamaDeploymentStatus,
    PendingChange,
    RejectedCandidate,
)
from .ownership import endpoint
from .units import format_time, parse_time

NORMAL, WARNING = "Normal", "Warning"
#: Condition and Event reasons of what writing the owned objects came to (decide_objects), and of a
#: Deployment that cannot create pods.
OWNERSHIP_CONFLICT = "OwnershipConflict"
OBJECT_REFUSED = "ObjectRefused"
WAITING_FOR_GC = "WaitingForGarbageCollection"
REPLICA_FAILURE = "ReplicaFailure"


@dataclass(frozen=True)
class Observed:
    name: str
    namespace: str
    generation: int
    status: LlamaDeploymentStatus
    deployment_status: dict | None  # the owned Deployment's .status, None when it does not exist
    now: datetime
    upgrade_delay: timedelta = timedelta(minutes=2)
    #: Whether the Deployment's observed spec is the render of the plan to apply (the handler compares
    #: hashes); None: assume it is unless the plan changes in this decision.
    deployment_runs_plan: bool | None = None


@dataclass
class Decision:
    apply: ChosenPlan | None  # what the workload should run; None: leave the workload as it is
    status: LlamaDeploymentStatus
    events: list[tuple[str, str, str]] = field(default_factory=list)
    outcome: str = "requested"  # requested | fallback | infeasible | invalid (for metrics)


def _conditions(previous: list[Condition], wanted: list[tuple[str, str, str, str]], now: datetime,
                generation: int) -> list[Condition]:
    """Conditions with lastTransitionTime kept while their status does not change (API conventions)."""
    before = {c.type: c for c in previous}
    out = []
    for ctype, status, reason, message in wanted:
        old = before.get(ctype)
        since = old.lastTransitionTime if old is not None and old.status == status else format_time(now)
        out.append(Condition(type=ctype, status=status, reason=reason, message=message,
                             lastTransitionTime=since, observedGeneration=generation))
    return out


def fallback_kind(spec: LlamaDeploymentSpec, chosen: ChosenPlan) -> str | None:
    """Why the plan is not the requested model at full precision, as a condition reason.

    A plan in force may name a quantization the catalog has dropped since (an operator upgrade): while
    nothing else fits it keeps running, and it is reported as NotInCatalog, since its precision is no
    longer known."""
    catalog = load_catalog()
    if chosen.model != spec.model:
        return "SmallerModel"
    quant = catalog.quantizations.get(chosen.quantization)
    if quant is None:
        return "NotInCatalog"
    if quant.quality < 100:
        return "Quantized"
    if chosen.kvCacheDtype != "auto":
        return "KVCacheQuantized"
    return None


def _choice(plan: Plan) -> str:
    """What a plan serves, for an Event; a fallback says why (one Event per decision, not one more)."""
    assert plan.chosen is not None
    chosen = plan.chosen.describe()
    if not plan.fallback:
        return chosen
    return f"{chosen}, a fallback because {plan.fallback_reason.removeprefix(f'chose {chosen} because ')}"


def _rejected(plan: Plan) -> list[RejectedCandidate]:
    return [
        RejectedCandidate(model=c.model.id, quantization=c.quant.id, runtime=c.runtime, hardware=c.hardware,
                          reasons=list(c.reasons))
        for c in plan.rejected[:STATUS_REJECTED_LIMIT]
    ]


def decide_invalid(obs: Observed, problems: list[str]) -> Decision:
    status = obs.status.model_copy(deep=True)
    message = "; ".join(problems)
    first_time = not (status.phase == "Invalid" and status.observedGeneration == obs.generation)
    status.phase = "Invalid"
    status.message = message
    status.observedGeneration = obs.generation
    status.conditions = _conditions(status.conditions, [
        ("Ready", "False" if not status.readyReplicas else "True", "InvalidSpec", message),
        ("PlanFeasible", "False", "InvalidSpec", message),
    ], obs.now, obs.generation)
    events = [(WARNING, "InvalidSpec", message)] if first_time else []
    return Decision(apply=None, status=status, events=events, outcome="invalid")


@dataclass(frozen=True)
class ObjectIssue:
    """Why an owned object was not written: `kind` is conflict (someone else's object of that name),
    superseded (left by a deleted LlamaDeployment of the same name, for the garbage collector), refused
    (by the API server) or blocked (a Deployment held back because of its claim); `message` says which
    object and what to do."""

    kind: str
    message: str


def decide_objects(obs: Observed, decision: Decision, issues: list[ObjectIssue]) -> Decision:
    """The decision once the objects were written, when some could not be: the phase says why (Invalid for
    a refusal, Degraded for a conflict, Pending while the garbage collector removes a predecessor's
    object), the message names each object and the fix, and one Warning Event says it when it is new.
    Whatever runs keeps running; the plan is kept (it applies once the object is fixed)."""
    if not issues:
        return decision
    prev = obs.status
    status = decision.status.model_copy(deep=True)
    kinds = {i.kind for i in issues}
    if "refused" in kinds:
        phase, reason = "Invalid", OBJECT_REFUSED
    elif "conflict" in kinds:
        phase, reason = "Degraded", OWNERSHIP_CONFLICT
    else:
        phase, reason = "Pending", WAITING_FOR_GC
    order = {"refused": 0, "conflict": 1, "superseded": 2, "blocked": 3}
    message = "; ".join(i.message for i in sorted(issues, key=lambda i: order.get(i.kind, 9)))
    status.phase = phase
    status.message = message
    serving = reason == OBJECT_REFUSED and bool(status.readyReplicas) and \
        (status.readyReplicas or 0) >= (status.replicas or 0)
    overrides = {
        "Ready": ("True" if serving else "False", reason, message),
        "Progressing": ("False", reason, message),
    }
    wanted = [(c.type, *overrides[c.type]) if c.type in overrides else (c.type, c.status, c.reason, c.message)
              for c in status.conditions]
    status.conditions = _conditions(prev.conditions, wanted, obs.now, obs.generation)
    events = [e for e in decision.events if e[1] not in ("Ready", "Degraded", REPLICA_FAILURE)]
    # A Warning when a refusal or conflict is new, not when an object waiting for the garbage collector
    # comes or goes beside one already said.
    said = prev.message or ""
    new_trouble = [i for i in issues if i.kind in ("refused", "conflict") and i.message not in said]
    if reason != WAITING_FOR_GC and (prev.phase != phase or new_trouble):
        events.append((WARNING, reason, message))
    return replace(decision, status=status, events=events)


def decide(obs: Observed, spec: LlamaDeploymentSpec, plan: Plan, current_problems: list[str] | None) -> Decision:
    """`current_problems`: why the plan in force no longer fits (empty: it still fits; None: none in force)."""
    prev = obs.status
    status = prev.model_copy(deep=True)
    current = prev.plan
    new = plan.chosen.to_chosen_plan() if plan.chosen is not None else None
    spec_changed = prev.observedGeneration != obs.generation
    events: list[tuple[str, str, str]] = []
    apply: ChosenPlan | None = current
    pending: PendingChange | None = None

    if new is None:
        outcome = "infeasible"
        if prev.phase != "Unschedulable" or spec_changed:
            events.append((WARNING, "Unschedulable", f"No feasible plan: {plan.fallback_reason}"))
    else:
        outcome = "fallback" if plan.fallback else "requested"
        if current is None or spec_changed or current_problems:
            if not new.same_choice(current):
                apply = new
                if current is None:
                    events.append((NORMAL, "Planned", f"Serving {_choice(plan)}"))
                elif current_problems:
                    events.append((WARNING, "Replanned", f"{current.variant} no longer fits "
                                   f"({'; '.join(current_problems)}); moving to {_choice(plan)}"))
                else:
                    events.append((NORMAL, "Replanned", f"Spec changed: moving from {current.variant} to "
                                   f"{_choice(plan)}"))
            else:
                apply = new
        elif new.same_choice(current):
            apply = new  # same choice; refresh the predictions
        else:
            # A different plan while the one in force still works: a better one after a cluster change.
            better = rank(spec, new) < rank(spec, current)
            old_pending = prev.pendingChange
            # Status keeps whole seconds: round up, so the wait is never shorter than the delay.
            since = obs.now.replace(microsecond=0) + (timedelta(seconds=1) if obs.now.microsecond else timedelta())
            if old_pending is not None and old_pending.plan.same_choice(new):
                since = parse_time(old_pending.since)
            if obs.now - since >= obs.upgrade_delay:
                apply = new
                verb = "Upgraded" if better else "Replanned"
                events.append((NORMAL, verb, f"Capacity stable for {int(obs.upgrade_delay.total_seconds())}s: moving "
                               f"from {current.variant} to {_choice(plan)}"))
            else:
                pending = PendingChange(plan=new, since=format_time(since), reason=(
                    f"{plan.chosen.describe()} became possible; moving once the capacity has been stable until "
                    f"{format_time(since + obs.upgrade_delay)}"))
                if old_pending is None or not old_pending.plan.same_choice(new):
                    events.append((NORMAL, "UpgradePending", pending.reason))

    status.pendingChange = pending
    status.observedGeneration = obs.generation
    if apply is not None:
        status.plan = apply
        status.variant = apply.variant
        status.runtime = apply.runtime
        status.endpoint = endpoint(obs.name, obs.namespace, apply.runtime)
        if new is not None and apply.same_choice(new):
            kind = fallback_kind(spec, apply)
            status.fallback = FallbackStatus(inForce=kind is not None, requestedModel=spec.model,
                                             reason=plan.fallback_reason if kind else "")
    status.rejected = _rejected(plan)
    status.notes = list(plan.notes)

    # Replicas and phase, from the owned Deployment. None (not made yet) reads as the empty status it will
    # have once this pass has made it, so the next pass has nothing new to write.
    desired = spec.replicas
    ds = obs.deployment_status or {}
    ready = int(ds.get("readyReplicas") or 0)
    updated = int(ds.get("updatedReplicas") or 0)
    total = int(ds.get("replicas") or 0)  # old and new pods: more than desired while a rollout is on
    if obs.deployment_runs_plan is None:
        rolling_to_new = apply is not None and not apply.same_choice(current)
    else:
        rolling_to_new = not obs.deployment_runs_plan
    status.replicas = desired
    status.readyReplicas = ready
    status.ready = f"{ready}/{desired}"
    stalled = any(c.get("type") == "Progressing" and c.get("status") == "False"
                  for c in ds.get("conditions") or [])
    # The Deployment's controller could not create pods (admission refused them, a quota is full): it
    # says so in ReplicaFailure, and waiting will not help.
    failure = next((str(c.get("message") or c.get("reason") or "pods cannot be created")
                    for c in ds.get("conditions") or []
                    if c.get("type") == "ReplicaFailure" and c.get("status") == "True"), None)

    if new is None:
        phase = "Unschedulable"
        message = f"No feasible plan: {plan.fallback_reason}"
        if ready:
            message = f"Still serving {current.variant if current else 'the previous plan'} on {ready} replica(s). " \
                      + message
    elif ready >= desired and updated >= desired and total <= desired and not rolling_to_new:
        phase, message = "Ready", f"Serving {apply.variant} on {apply.runtime}"
    elif failure is not None:
        phase, message = "Degraded", f"{ready}/{desired} replicas ready; the Deployment cannot create pods: {failure}"
    elif stalled:
        phase, message = "Degraded", f"{ready}/{desired} replicas ready; the rollout is not progressing"
    elif prev.phase in ("Ready", "Degraded") and not rolling_to_new and updated >= desired:
        phase, message = "Degraded", f"{ready}/{desired} replicas ready"
    elif updated == 0 and ready == 0:
        phase, message = "Pending", "Waiting for the first replica to be scheduled"
    else:
        phase, message = "Deploying", f"Rolling out {apply.variant}: {ready}/{desired} replicas ready"
    if pending is not None and phase == "Ready":
        message += f"; {pending.reason}"
    status.phase = phase
    status.message = message

    fb = status.fallback
    failing = failure is not None and phase == "Degraded"
    wanted = [
        ("Ready", "True" if phase in ("Ready",) or (ready >= desired and desired > 0) else "False",
         "ReplicasReady" if ready >= desired else REPLICA_FAILURE if failing else "ReplicasNotReady",
         f"{ready}/{desired} replicas ready" + (f": {failure}" if failing and ready < desired else "")),
        ("PlanFeasible", "True" if new is not None else "False",
         "Planned" if new is not None else "NoFeasiblePlan",
         plan.chosen.describe() if plan.chosen is not None else plan.fallback_reason),
        ("FallbackApplied", "True" if fb and fb.inForce else "False",
         (fallback_kind(spec, apply) or "RequestedVariant") if apply is not None else "NoPlan",
         fb.reason if fb and fb.inForce else "Serving the requested model at its best precision"),
        ("Progressing",
         "True" if pending is not None or phase in ("Deploying", "Pending") else "False",
         "UpgradePending" if pending is not None else REPLICA_FAILURE if failing else
         ("RollingOut" if phase in ("Deploying", "Pending") else "Stable"),
         pending.reason if pending is not None else failure if failing else message),
    ]
    status.conditions = _conditions(prev.conditions, wanted, obs.now, obs.generation)
    if prev.phase != phase and phase == "Ready":
        events.append((NORMAL, "Ready", message))
    if failing:
        said = any(c.type == "Progressing" and c.reason == REPLICA_FAILURE and c.message == failure
                   for c in prev.conditions)
        if not said:  # one Warning per failure the controller reports, not one per pass
            events.append((WARNING, REPLICA_FAILURE, f"The Deployment cannot create pods: {failure}"))
    elif prev.phase == "Ready" and phase == "Degraded":
        events.append((WARNING, "Degraded", message))
    return Decision(apply=apply, status=status, events=events, outcome=outcome)
