"""The reconcile decision: from what the operator sees, what to run, what status to write, what to say.

Pure: a pass (passes.py) gathers the inputs (the object, a fresh plan, whether the plan in force still
fits, the owned Deployment's status, the time) and carries out the Decision. Rules:

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
from .slo import SLO_MET, Judgement
from .status import (
    AdapterStatus,
    ChosenPlan,
    Condition,
    FallbackStatus,
    LlamaDeploymentStatus,
    PendingChange,
    RejectedCandidate,
)
from .candidate import plan_hardware
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
    #: Whether the Deployment's observed spec is the render of the plan to apply (the pass compares it with
    #: the render); None: assume it is unless the plan changes in this decision.
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
    # status.adapters is kept as it was, like the plan: the workload keeps running, and with it the adapters
    # of the last valid spec, which is what a request can still use (not those the invalid spec names).
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
    """What to run, what status to write and what to say, from a fresh plan and the Deployment's status.

    `current_problems`: why the plan in force no longer fits (empty: it still fits; None: none in force)."""
    prev = obs.status
    new = plan.chosen.to_chosen_plan() if plan.chosen is not None else None
    apply, pending, events, outcome = _choose_plan(obs, spec, plan, new, current_problems)
    status = prev.model_copy(deep=True)
    _record_plan(status, obs, spec, plan, new, apply, pending)
    rollout = _read_rollout(obs, spec.replicas, apply)
    status.replicas = rollout.desired
    status.readyReplicas = rollout.ready
    status.ready = f"{rollout.ready}/{rollout.desired}"
    status.adapters = _adapter_statuses(obs.name, spec, apply if plan.chosen is not None else None, rollout)
    status.adapterCount = len(status.adapters) if status.adapters else None
    status.phase, status.message = _phase(prev, plan, apply, pending, rollout)
    failing = rollout.failure if status.phase == "Degraded" else None
    status.conditions = _conditions(prev.conditions, _wanted_conditions(status, spec, plan, apply, failing),
                                    obs.now, obs.generation)
    events += _phase_events(prev, status.phase, status.message, failing)
    return Decision(apply=apply, status=status, events=events, outcome=outcome)


def _choose_plan(obs: Observed, spec: LlamaDeploymentSpec, plan: Plan, new: ChosenPlan | None,
                 current_problems: list[str] | None
                 ) -> tuple[ChosenPlan | None, PendingChange | None, list[tuple[str, str, str]], str]:
    """The plan to apply (None: leave the workload as it is), the upgrade waiting for the upgrade delay, the
    Events that say so, and the outcome for the metrics."""
    prev = obs.status
    current = prev.plan
    spec_changed = prev.observedGeneration != obs.generation
    if new is None:  # no feasible plan: whatever runs keeps running
        said = prev.phase == "Unschedulable" and not spec_changed
        events = [] if said else [(WARNING, "Unschedulable", f"No feasible plan: {plan.fallback_reason}")]
        return current, None, events, "infeasible"
    outcome = "fallback" if plan.fallback else "requested"
    if current is None or spec_changed or current_problems:
        return new, None, _replan_events(plan, new, current, current_problems), outcome
    if new.same_choice(current):
        return new, None, [], outcome  # same choice; refresh the predictions
    apply, pending, events = _upgrade_after_delay(obs, spec, plan, new, current)
    return apply, pending, events, outcome


def _replan_events(plan: Plan, new: ChosenPlan, current: ChosenPlan | None,
                   current_problems: list[str] | None) -> list[tuple[str, str, str]]:
    """What a plan applied at once says: a first plan, a plan in force that lost its hardware, a spec change."""
    if new.same_choice(current):
        return []
    if current is None:
        return [(NORMAL, "Planned", f"Serving {_choice(plan)}")]
    if current_problems:
        return [(WARNING, "Replanned", f"{current.variant} no longer fits ({'; '.join(current_problems)}); "
                 f"moving to {_choice(plan)}")]
    return [(NORMAL, "Replanned", f"Spec changed: moving from {current.variant} to {_choice(plan)}")]


def _upgrade_after_delay(obs: Observed, spec: LlamaDeploymentSpec, plan: Plan, new: ChosenPlan, current: ChosenPlan
                         ) -> tuple[ChosenPlan, PendingChange | None, list[tuple[str, str, str]]]:
    """A different plan while the one in force still works (a better one after a cluster change) applies
    once it has been proposed continuously for the upgrade delay; until then it is pending."""
    old_pending = obs.status.pendingChange
    # Status keeps whole seconds: round up, so the wait is never shorter than the delay.
    since = obs.now.replace(microsecond=0) + (timedelta(seconds=1) if obs.now.microsecond else timedelta())
    if old_pending is not None and old_pending.plan.same_choice(new):
        since = parse_time(old_pending.since)
    if obs.now - since >= obs.upgrade_delay:
        verb = "Upgraded" if rank(spec, new) < rank(spec, current) else "Replanned"
        return new, None, [(NORMAL, verb, f"Capacity stable for {int(obs.upgrade_delay.total_seconds())}s: moving "
                            f"from {current.variant} to {_choice(plan)}")]
    pending = PendingChange(plan=new, since=format_time(since), reason=(
        f"{plan.chosen.describe()} became possible; moving once the capacity has been stable until "
        f"{format_time(since + obs.upgrade_delay)}"))
    said = old_pending is not None and old_pending.plan.same_choice(new)
    return current, pending, [] if said else [(NORMAL, "UpgradePending", pending.reason)]


def _record_plan(status: LlamaDeploymentStatus, obs: Observed, spec: LlamaDeploymentSpec, plan: Plan,
                 new: ChosenPlan | None, apply: ChosenPlan | None, pending: PendingChange | None) -> None:
    """Write the plan in force, the pending upgrade and what the planner said into `status`."""
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


@dataclass(frozen=True)
class _Rollout:
    """The owned Deployment's replicas and conditions, as the phase reads them."""

    desired: int
    ready: int
    updated: int
    total: int  # old and new pods: more than desired while a rollout is on
    rolling_to_new: bool
    stalled: bool
    #: The controller could not create pods (admission refused them, a quota is full): it says so in
    #: ReplicaFailure, and waiting will not help.
    failure: str | None

    @property
    def serves_plan(self) -> bool:
        """Every pod is of the plan to apply and one at least is ready: whichever pod takes a request runs that
        plan (while old pods remain, a request for an adapter they lack may reach one of them)."""
        return not self.rolling_to_new and self.ready > 0 and self.total <= self.updated


def _read_rollout(obs: Observed, desired: int, apply: ChosenPlan | None) -> _Rollout:
    """A Deployment not made yet (None) reads as the empty status it will have once this pass has made it,
    so the next pass has nothing new to write."""
    ds = obs.deployment_status or {}
    conditions = ds.get("conditions") or []
    if obs.deployment_runs_plan is None:
        rolling_to_new = apply is not None and not apply.same_choice(obs.status.plan)
    else:
        rolling_to_new = not obs.deployment_runs_plan
    return _Rollout(
        desired=desired,
        ready=int(ds.get("readyReplicas") or 0),
        updated=int(ds.get("updatedReplicas") or 0),
        total=int(ds.get("replicas") or 0),
        rolling_to_new=rolling_to_new,
        stalled=any(c.get("type") == "Progressing" and c.get("status") == "False" for c in conditions),
        failure=next((str(c.get("message") or c.get("reason") or "pods cannot be created") for c in conditions
                      if c.get("type") == "ReplicaFailure" and c.get("status") == "True"), None),
    )


def _adapter_statuses(name: str, spec: LlamaDeploymentSpec, serving: ChosenPlan | None, rollout: _Rollout
                      ) -> list[AdapterStatus] | None:
    """status.adapters: each of spec.adapters, Pending until a plan runs it, Loading while the Deployment rolls
    that plan out, Ready once it serves it. `serving`: the plan applied for this spec; None when there is none
    (with no feasible plan, what keeps running was planned for an earlier spec or cluster, and may lack the
    adapters). None without adapters, so a spec without them writes the status it always did."""
    if not spec.adapters:
        return None
    if serving is None:
        return [AdapterStatus(name=a.name, source=a.source, state="Pending") for a in spec.adapters]
    state = "Ready" if rollout.serves_plan else "Loading"
    return [AdapterStatus(name=a.name, source=a.source, state=state,
                          call=_adapter_call(serving.runtime, name, a.name, index, len(spec.adapters)))
            for index, a in enumerate(spec.adapters)]


def _adapter_call(runtime: str, deployment: str, adapter: str, index: int, count: int) -> str:
    """How a request uses the adapter at `index` of spec.adapters (engines.yaml lora.adapters.syntax). vLLM
    serves each adapter under its name. llama.cpp routes no model names: the render applies a lone adapter to
    every request, and loads several at scale 0 (--lora-scaled FILE:0), for a request to pick one by id (its
    index among the adapters loaded)."""
    if runtime == "vllm":
        return f'"model": "{adapter}"'
    if count == 1:
        return f'"model": "{deployment}" (applied to every request)'
    return f'"model": "{deployment}", "lora": [{{"id": {index}, "scale": 1.0}}]'


def _phase(prev: LlamaDeploymentStatus, plan: Plan, apply: ChosenPlan | None, pending: PendingChange | None,
           r: _Rollout) -> tuple[str, str]:
    """The phase and its message; a pending upgrade is said beside Ready."""
    if plan.chosen is None:
        phase = "Unschedulable"
        message = f"No feasible plan: {plan.fallback_reason}"
        if r.ready:
            message = f"Still serving {prev.plan.variant if prev.plan else 'the previous plan'} on {r.ready} " \
                      f"replica(s). " + message
    elif r.ready >= r.desired and r.updated >= r.desired and r.total <= r.desired and not r.rolling_to_new:
        phase, message = "Ready", f"Serving {apply.variant} on {apply.runtime}"
    elif r.failure is not None:
        phase, message = "Degraded", f"{r.ready}/{r.desired} replicas ready; the Deployment cannot create pods: " \
                                     f"{r.failure}"
    elif r.stalled:
        phase, message = "Degraded", f"{r.ready}/{r.desired} replicas ready; the rollout is not progressing"
    elif prev.phase in ("Ready", "Degraded") and not r.rolling_to_new and r.updated >= r.desired:
        phase, message = "Degraded", f"{r.ready}/{r.desired} replicas ready"
    elif r.updated == 0 and r.ready == 0:
        phase, message = "Pending", "Waiting for the first replica to be scheduled"
    else:
        phase, message = "Deploying", f"Rolling out {apply.variant}: {r.ready}/{r.desired} replicas ready"
    if pending is not None and phase == "Ready":
        message += f"; {pending.reason}"
    return phase, message


def _wanted_conditions(status: LlamaDeploymentStatus, spec: LlamaDeploymentSpec, plan: Plan,
                       apply: ChosenPlan | None, failing: str | None) -> list[tuple[str, str, str, str]]:
    """(type, status, reason, message) of each condition, from the status decided so far. `failing`: why the
    Deployment cannot create pods, when that makes the phase Degraded."""
    phase, message, pending, fb = status.phase, status.message, status.pendingChange, status.fallback
    ready, desired = status.readyReplicas, status.replicas
    feasible = plan.chosen is not None
    rolling = phase in ("Deploying", "Pending")
    return [
        ("Ready", "True" if phase == "Ready" or (ready >= desired and desired > 0) else "False",
         "ReplicasReady" if ready >= desired else REPLICA_FAILURE if failing is not None else "ReplicasNotReady",
         f"{ready}/{desired} replicas ready" + (f": {failing}" if failing is not None and ready < desired else "")),
        ("PlanFeasible", "True" if feasible else "False", "Planned" if feasible else "NoFeasiblePlan",
         plan.chosen.describe() if feasible else plan.fallback_reason),
        ("FallbackApplied", "True" if fb and fb.inForce else "False",
         (fallback_kind(spec, apply) or "RequestedVariant") if apply is not None else "NoPlan",
         fb.reason if fb and fb.inForce else "Serving the requested model at its best precision"),
        ("Progressing",
         "True" if pending is not None or rolling else "False",
         "UpgradePending" if pending is not None else REPLICA_FAILURE if failing is not None else
         ("RollingOut" if rolling else "Stable"),
         pending.reason if pending is not None else failing if failing is not None else message),
    ]


def _phase_events(prev: LlamaDeploymentStatus, phase: str, message: str, failing: str | None
                  ) -> list[tuple[str, str, str]]:
    """Events of a phase transition: Ready reached, a Deployment that cannot create pods (one Warning per
    failure the controller reports, not one per pass), Ready lost."""
    events = []
    if prev.phase != phase and phase == "Ready":
        events.append((NORMAL, "Ready", message))
    if failing is not None:
        said = any(c.type == "Progressing" and c.reason == REPLICA_FAILURE and c.message == failing
                   for c in prev.conditions)
        if not said:
            events.append((WARNING, REPLICA_FAILURE, f"The Deployment cannot create pods: {failing}"))
    elif prev.phase == "Ready" and phase == "Degraded":
        events.append((WARNING, "Degraded", message))
    return events


def decide_slo(obs: Observed, decision: Decision, judgement: Judgement) -> Decision:
    """The decision with what the SLO loop concluded (slo.judge): status.observed, the corrections, the loop's
    timers, the SLOMet condition and its Events. A breach without remedy makes a serving deployment Degraded
    with observed versus predicted: the corrected estimates fit no variant (the planner found nothing, and the
    plan in force keeps running), or the load needs more than maxReplicas or the free capacity."""
    status = decision.status.model_copy(deep=True)
    status.observed = judgement.observed
    status.corrections = judgement.corrections
    status.slo = judgement.state if judgement.state.model_dump(exclude_none=True) else None
    events = list(decision.events)
    if judgement.corrected is not None:  # say what was observed where the move is announced
        events = [(t, r, f"{m} ({judgement.breach_message})" if r == "Replanned" else m) for t, r, m in events]
    events = judgement.events + events  # the breach is said before what is done about it
    plan = status.plan
    corrected_in_force = plan is not None and any(
        c.variant == plan.variant and c.hardware == plan_hardware(plan) for c in judgement.corrections)
    message = None
    if decision.outcome == "infeasible" and corrected_in_force and status.readyReplicas:
        message = (f"{judgement.breach_message or 'SLO missed with the corrected estimates'}; no variant meets the "
                   f"SLO with corrected estimates, so {plan.variant} keeps serving: {status.message}")
    elif judgement.breach_message and judgement.corrected is None and status.phase == "Ready":
        message = judgement.breach_message
    if message is not None:  # said by the one Degraded Event, not once more per pass as Unschedulable or Ready
        events = [e for e in events if e[1] not in ("Unschedulable", "Ready")]
        if obs.status.phase != "Degraded":
            events.append((WARNING, "Degraded", message))
        status.phase, status.message = "Degraded", message
    wanted = [(c.type, c.status, c.reason, c.message) for c in status.conditions if c.type != SLO_MET]
    met = judgement.condition
    before = next((c for c in obs.status.conditions if c.type == SLO_MET), None)
    if not judgement.observed_fresh and before is not None and (before.status, before.reason) == met[:2]:
        met = (met[0], met[1], before.message)  # the same verdict on much the same figures: nothing to write
    wanted.append((SLO_MET, *met))
    status.conditions = _conditions(obs.status.conditions, wanted, obs.now, obs.generation)
    return replace(decision, status=status, events=events)
