"""One pass for one LlamaDeployment, as a worker runs it: read, call the pure core (planner,
reconcile.decide, render), write. A pass that changes nothing sends no request.

Objects it does not own are never written: a Deployment, Service or claim of the same name that this
LlamaDeployment does not control is a conflict (status Degraded, one Warning Event), and stays as it is.
Owned objects are compared with their render by content (live.is_current), so a hand edit is written
back. An object the API server refuses (an invalid toleration, a storage class name...) makes the
status Invalid with the server's message, once; the same render is not sent again before the spec (or
the plan) changes or the resync period has passed.

Reliability rules (tests/reliability/ proves them): a failed pass is retried with a backoff that
doubles up to `max_error_backoff_seconds` and resets after a good pass, so neither a broken object nor
an API outage makes a hot loop; an invalid spec is written down once (phase Invalid, one Warning
Event) and then costs nothing. A pass posts its Events before it writes the status that records the
transition, each under a name derived from that transition (the object's uid, the status the pass
started from, the event), so a pass that is retried or redone by a restarted operator posts the same
names again: an Event is neither lost (the status is not written until it is posted) nor doubled
(the API server answers 409 to the second post).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, NamedTuple

from . import api, placement, planner
from .api import SpecError
from .crd import enum_problems
from .fields import name_problems
from .finetune import name_clash_problems
from .kube import RESTORED, Applied, event_body
from .kubeclient import api_message
from .live import Live, is_current, rendered_fingerprint
from .ownership import canonical, group_name
from .reconcile import (OWNERSHIP_CONFLICT, WAITING_FOR_GC, WARNING, Decision, ObjectIssue, Observed, decide,
                        decide_invalid, decide_objects, decide_slo)
from .drafts import keep_draft_length
from .slo import SLO_MET, Judgement, judge, planner_corrections
from .render import Owner, render
from .state import WATCHED_KINDS, Key, OperatorState, Promise, Settings
from .status import ChosenPlan, LlamaDeploymentStatus
from .units import parse_time

log = logging.getLogger("llama_operator")


async def run_pass(state: OperatorState, key: Key) -> None:
    """A worker's pass for `key`, and when the next unprompted one is due: after the resync period, when a
    waiting upgrade has waited long enough, or after a failure, with a backoff that doubles up to
    `max_error_backoff_seconds` and resets after a good pass (no hot loop on a broken object or an API
    outage)."""
    if key not in state.bodies:
        return  # deleted since it was queued
    try:
        decision = await one_pass(state, key)
    except Exception as e:  # noqa: BLE001 - logged, retried
        failures = state.failures[key] = state.failures.get(key, 0) + 1
        backoff = _error_backoff(state.settings, failures)
        if isinstance(getattr(e, "status", None), int):  # the API server's answer: it says what went wrong
            log.error("reconcile of %s/%s failed: %s (%s); retrying in %gs", *key, getattr(e, "status"),
                      api_message(e), backoff)
        else:
            log.exception("reconcile of %s/%s failed; retrying in %gs", *key, backoff)
        if key in state.bodies:
            state.queue.add_after(key, backoff)
        return
    state.failures.pop(key, None)
    if key not in state.bodies:
        return  # deleted during the pass
    state.queue.add_after(key, _next_pass_in(state.settings, decision))


def _error_backoff(settings: Settings, failures: int) -> float:
    """Seconds before retrying a pass that failed `failures` times in a row."""
    return min(settings.error_backoff_seconds * 2 ** (failures - 1),
               max(settings.max_error_backoff_seconds, settings.error_backoff_seconds))


def _next_pass_in(settings: Settings, decision: Decision | None) -> float:
    """Seconds before the next unprompted pass after a good one."""
    delay = settings.resync_seconds
    if decision is not None and any(c.type == "Progressing" and c.reason == WAITING_FOR_GC
                                    for c in decision.status.conditions):
        delay = min(delay, settings.error_backoff_seconds)  # the claim is not watched: look again soon
    pending = decision.status.pendingChange if decision is not None else None
    if pending is not None:  # wake when the better plan has waited long enough
        due = parse_time(pending.since) + settings.upgrade_delay
        delay = min(delay, max(0.5, (due - datetime.now(timezone.utc)).total_seconds() + 0.5))
    return delay


async def one_pass(state: OperatorState, key: Key) -> Decision | None:
    """One pass for one LlamaDeployment: plan, decide, render and apply, write status and events.

    The work queue never runs two passes of one deployment at once. A pass racing the deletion of its
    LlamaDeployment may still create a Deployment for an owner that is gone: the garbage collector removes
    it, as it removes everything a deleted LlamaDeployment owns."""
    body = state.bodies.get(key)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    started = time.monotonic()
    raw_status = state.written_status.get(key, body.get("status") or {})
    obs = Observed(name=key[1], namespace=key[0], generation=int(body["metadata"].get("generation") or 1),
                   status=_lenient_status(raw_status), deployment_status=None, now=datetime.now(timezone.utc),
                   upgrade_delay=state.settings.upgrade_delay)
    error = False
    try:
        return await _decide_and_write(state, key, body, obs, raw_status)
    except Exception:
        error = key in state.bodies  # a write that failed because the object went is no error
        raise
    finally:
        state.metrics.observe_reconcile(time.monotonic() - started, error=error, namespace=key[0], name=key[1])


async def _decide_and_write(state: OperatorState, key: Key, body: dict, obs: Observed,
                            raw_status: Any) -> Decision | None:
    """The pass proper; None when the LlamaDeployment was deleted during it."""
    spec, problems = _read_spec(key[1], body.get("spec"))
    objects: list[dict] = []
    owned: dict[str, dict[str, Live]] = {}
    if spec is None:
        decision = decide_invalid(obs, problems)
    else:
        obs, decision, objects, owned, spec = _plan_and_render(state, key, body["metadata"], obs, spec)
    restored: list[tuple[dict, Applied]] = []
    if objects:
        written = await _write_objects(state, key, objects, owned, obs, decision)
        if written is None:
            return None  # deleted during the pass
        decision, restored = written
        await _retire_replaced_workload(state, key, body["metadata"].get("uid"), decision, owned)
        await _retire_network_policy(state, key, body["metadata"].get("uid"), objects, owned)
    events = _event_bodies(body, key, obs.status, decision, restored)
    if not await _record(state, key, events, decision, raw_status):
        return None  # deleted during the pass
    if key not in state.bodies:
        return None  # deleted during the pass: no metrics for it
    _publish(state, key, spec, decision)
    return decision


def _read_spec(name: str, raw: Any) -> tuple[api.LlamaDeploymentSpec | None, list[str]]:
    """The spec, or None and what is wrong with it or with the object's name."""
    problems = name_problems(name)
    try:
        spec = _parse_spec(raw)
    except SpecError as e:
        return None, problems + e.problems
    problems += name_clash_problems(spec, name)
    return (None, problems) if problems else (spec, [])


def _parse_spec(raw: Any) -> api.LlamaDeploymentSpec:
    """api.parse_spec, where any failure is a SpecError: a spec that trips an unexpected error in the checks
    (a bug) is reported as Invalid like any other bad spec, instead of failing every pass for ever."""
    try:
        return api.parse_spec(raw)
    except SpecError:
        raise
    except Exception as e:  # noqa: BLE001
        log.debug("parsing a spec raised %r; reporting it as invalid", e)
        raise SpecError(enum_problems(raw) or [f"spec: cannot be read ({type(e).__name__}: {e})"]) from e


def _lenient_status(raw: Any) -> LlamaDeploymentStatus:
    """The status as last written; an unreadable one (edited by hand) counts as empty."""
    try:
        return LlamaDeploymentStatus.model_validate(raw or {})
    except Exception:  # noqa: BLE001
        return LlamaDeploymentStatus()


class _Planned(NamedTuple):
    obs: Observed
    decision: Decision
    objects: list[dict]  # the render of the plan to apply; empty when the workload is left as it is
    owned: dict[str, dict[str, Live]]
    spec: api.LlamaDeploymentSpec  # with the replicas the SLO loop scaled to


def _plan_and_render(state: OperatorState, key: Key, meta: Mapping[str, Any], obs: Observed,
                     spec: api.LlamaDeploymentSpec) -> _Planned:
    """Plan on the capacity free for `key`, decide, hold the plan decided on, and render it.

    From reading the inventory to recording the promise, nothing awaits: no other deployment's pass can
    plan in between, so two never take the same free GPUs (nor flip between them)."""
    namespace, name = key
    owned = state.indexes.owned(key)
    current = obs.status.plan
    deployment = _owned_workload(owned, name, _workload_kind(current), meta.get("uid"))
    if deployment is not None:
        obs = replace(obs, deployment_status=deployment.status)
    inventory = state.inventory_for(key)
    forbidden = state.settings.forbidden_tolerations
    judgement = _judge_slo(state, key, obs, spec, inventory)
    loop = dict(corrections=judgement.planner_corrections(), measured=judgement.measured_acceptance,
                drafts_off=judgement.drafts_off) if judgement is not None else {}
    if judgement is not None and judgement.replicas != spec.replicas:
        spec = spec.model_copy(update={"replicas": judgement.replicas})  # scaled by the SLO loop
    plan = planner.plan(keep_draft_length(spec, current), inventory, forbidden_tolerations=forbidden, **loop)
    problems = planner.check_choice(spec, inventory, current, forbidden_tolerations=forbidden,
                                    corrections=loop.get("corrections"), drafts_off=loop.get("drafts_off")) \
        if current is not None else None

    def decide_all(obs: Observed) -> Decision:
        decision = decide(obs, spec, plan, problems)
        return decide_slo(obs, decision, judgement) if judgement is not None else decision

    decision = decide_all(obs)
    if decision.apply is None:
        return _Planned(obs, decision, [], owned, spec)
    _promise(state, key, spec, decision)
    owner = Owner(name=name, namespace=namespace, uid=meta["uid"])
    pod_spec = placement.with_pod_tolerations(spec, inventory, decision.apply, forbidden)
    objects = render(owner, pod_spec, decision.apply, state.settings.images)
    kind = _workload_kind(decision.apply)
    if kind != _workload_kind(current):  # one node to several or back: the status is the new workload's
        deployment = _owned_workload(owned, name, kind, meta.get("uid"))
        obs = replace(obs, deployment_status=deployment.status if deployment is not None else None)
        decision = decide_all(obs)
    runs = deployment is not None and _runs(deployment, objects, state.accepted.get(key, {}))
    if deployment is not None and runs != decision.apply.same_choice(current):
        # decide assumed the Deployment runs the plan in force; it knows better now.
        obs = replace(obs, deployment_runs_plan=runs)
        decision = decide_all(obs)
    for obj in objects:
        if obj["kind"] in WATCHED_KINDS:
            state.rendered[(obj["kind"], namespace, obj["metadata"]["name"])] = rendered_fingerprint(obj)
    if judgement is not None and judgement.action is not None:
        state.metrics.record_slo_action(namespace, name, judgement.action)
    return _Planned(obs, decision, objects, owned, spec)


def _judge_slo(state: OperatorState, key: Key, obs: Observed, spec: api.LlamaDeploymentSpec,
               inventory) -> Judgement | None:
    """The SLO loop's verdict for this pass (slo.judge), or None when the loop is off (`run --slo-source off`).
    Scaling out is asked of the planner first: n replicas of the plan in force must fit."""
    if state.observer is None:
        return None
    current = obs.status.plan
    forbidden = state.settings.forbidden_tolerations
    kept = planner_corrections(obs.status.corrections)
    off = obs.status.slo.draftsOff if obs.status.slo is not None else None

    def fits(n: int) -> bool:
        return current is not None and not planner.check_choice(
            spec.model_copy(update={"replicas": n}), inventory, current, forbidden_tolerations=forbidden,
            corrections=kept, drafts_off=off)

    return judge(obs.status, state.observations.get(key), spec, obs.now, state.settings.slo, fits)


def _promise(state: OperatorState, key: Key, spec: api.LlamaDeploymentSpec, decision: Decision) -> None:
    """Record the plan `key` now holds, and wake the deployments it may concern.

    A first plan takes only capacity that was free with every other plan in force reserved, so it breaks
    none of them; it can only take what a waiting upgrade counted on, so those re-check at once. A plan
    that moved or changed size may free capacity anyone could use: everyone re-plans."""
    promise = Promise(spec=spec, plan=decision.apply)
    if state.promises.get(key) == promise:
        return
    if state.set_promise(key, promise) is None:
        state.wake(other for other, written in state.written_status.items()
                   if other != key and written.get("pendingChange"))
    else:
        state.wake_all()


def _workload_kind(plan: ChosenPlan | None) -> str:
    """The kind that runs a plan's model servers: a LeaderWorkerSet when a replica spans nodes."""
    return "LeaderWorkerSet" if plan is not None and plan.nodesPerReplica > 1 else "Deployment"


def _owned_workload(owned: Mapping[str, Mapping[str, Live]], name: str, kind: str, uid: str | None) -> Live | None:
    """This LlamaDeployment's workload of `kind` as its watch shows it; None when there is none, or when the
    object of that name is someone else's (its status is not ours)."""
    live = owned.get(kind, {}).get(group_name(name) if kind == "LeaderWorkerSet" else name)
    return live if live is not None and live.owned_by(uid) else None


def _runs(deployment: Live, objects: list[dict], accepted: Mapping[tuple[str, str], tuple[str, str]]) -> bool:
    """Whether the workload's status is about the rendered spec: it holds the render (live.is_current:
    the content, not only the hash annotation), and its controller has observed that generation.
    Otherwise a rollout is starting (or the watch has not shown this operator's patch yet, or someone
    changed it by hand), and the replicas it counts are not the rendered ones."""
    rendered = next(o for o in objects if o["kind"] == deployment.kind)
    return is_current(rendered, deployment, accepted.get((deployment.kind, rendered["metadata"]["name"]))) \
        and deployment.observed


async def _retire_replaced_workload(state: OperatorState, key: Key, uid: str | None, decision: Decision,
                                    owned: Mapping[str, Mapping[str, Live]]) -> None:
    """Delete this LlamaDeployment's workload of the other kind (the Deployment a plan spanning nodes replaced,
    or the LeaderWorkerSet a plan on one node replaced) once the plan's workload serves (phase Ready): until
    then both run, and a model is not torn down before its replacement is ready. But when the old one runs on
    the GPU product the new plan needs, at once: the planner counted those GPUs (this deployment's own) as
    free, and the new pods cannot start while the old ones hold them (a group of 8x H100 nodes after one of
    them left, or the move up to it). Only an object this LlamaDeployment controls is ever deleted."""
    if decision.apply is None:
        return
    keep = _workload_kind(decision.apply)
    for kind in ("Deployment", "LeaderWorkerSet"):
        stale = _owned_workload(owned, key[1], kind, uid) if kind != keep else None
        if stale is not None and (decision.status.phase == "Ready" or stale.gpu_product == decision.apply.gpuProduct):
            log.info("%s/%s: deleting %s %s, replaced by the %s of the plan in force", *key, kind, stale.name, keep)
            await state.writer.delete(kind, key[0], stale.name, uid)


async def _retire_network_policy(state: OperatorState, key: Key, uid: str | None, objects: list[dict],
                                 owned: Mapping[str, Mapping[str, Live]]) -> None:
    """Delete this LlamaDeployment's NetworkPolicy once its spec no longer asks for one (access.allowedClients
    removed): left in place, it would go on admitting only the clients it once listed, where the spec now says
    every client may connect. Only a NetworkPolicy this LlamaDeployment controls is ever deleted."""
    if any(obj["kind"] == "NetworkPolicy" for obj in objects):
        return
    for live in owned.get("NetworkPolicy", {}).values():
        if live.owned_by(uid):
            log.info("%s/%s: deleting NetworkPolicy %s: spec.access.allowedClients is no longer set", *key, live.name)
            await state.writer.delete("NetworkPolicy", key[0], live.name, uid)


async def _write_objects(state: OperatorState, key: Key, objects: list[dict], owned: dict[str, dict[str, Live]],
                         obs: Observed, decision: Decision) -> tuple[Decision, list[tuple[dict, Applied]]] | None:
    """Write the rendered objects; the decision once they are written (decide_objects), and the hand edits
    undone. None when the LlamaDeployment was deleted during the writes."""
    # Objects last found held by someone else are read again (a GET), not created again (a 409).
    unowned = state.unowned.get(key, set())
    known = {kind: {n: live for n, live in lives.items() if (kind, n) not in unowned}
             for kind, lives in owned.items()}
    refused = state.refusals_for(key)
    applied = await state.writer.apply(objects, known, state.accepted.get(key, {}), refused, recheck=unowned)
    if key not in state.bodies:
        return None
    for message in state.applied(key, objects, applied, refused):
        log.warning("%s; not sent again before the spec changes or the next resync", message)
    issues = [ObjectIssue(a.result, a.message) for a in applied if a.problem]
    restored = [(obj, a) for obj, a in zip(objects, applied) if a.result == RESTORED]
    return decide_objects(obs, decision, issues), restored


def _event_bodies(body: dict, key: Key, status: LlamaDeploymentStatus, decision: Decision,
                  restored: list[tuple[dict, Applied]]) -> list[dict]:
    """The Events of this pass: the decision's, and one per hand edit undone (the version undone names
    it), each named from the transition it records (`status`: the one the pass started from)."""
    namespace, name = key
    uid = body["metadata"].get("uid")
    involved = {"apiVersion": body.get("apiVersion") or api.API_VERSION, "kind": body.get("kind") or api.KIND,
                "name": name, "namespace": namespace, "uid": uid}
    instance = os.environ.get("POD_ID") or os.environ.get("HOSTNAME", "")
    events = []
    if decision.events:
        seed = canonical([uid, status.model_dump(mode="json", exclude_none=True)])
        events = [event_body(involved, etype, reason, message, instance, seed=seed)
                  for etype, reason, message in decision.events]
        for etype, reason, message in decision.events:
            if reason == OWNERSHIP_CONFLICT:  # (a refusal is logged where it is new, in _write_objects)
                log.warning("%s/%s: %s", namespace, name, message)
    for obj, a in restored:
        log.warning("%s/%s: %s", namespace, name, a.message)
        events.append(event_body(involved, WARNING, "DriftCorrected", a.message, instance,
                                 seed=canonical([uid, obj["kind"], obj["metadata"]["name"], a.resource_version])))
    return events


async def _record(state: OperatorState, key: Key, events: list[dict], decision: Decision, raw_status: Any) -> bool:
    """Post the Events, then write the status when it changed; False when the LlamaDeployment is gone."""
    new_status = decision.status.model_dump(mode="json")
    status_changed = _without_nulls(new_status) != _without_nulls(raw_status)
    found = await state.writer.record(events, (*key, new_status) if status_changed else None)
    if found and status_changed:
        state.written_status[key] = new_status
    return found


def _without_nulls(value: Any) -> Any:
    """A status as the server keeps it: a merge patch drops the fields it sets to null."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _publish(state: OperatorState, key: Key, spec: api.LlamaDeploymentSpec | None, decision: Decision) -> None:
    status = decision.status
    if decision.events:
        state.metrics.record_plan_outcome(decision.outcome)
    plan = status.plan
    state.metrics.set_deployment(
        key[0], key[1],
        phase=status.phase or "Pending",
        requested_model=spec.model if spec else "",
        model=plan.model if plan else "",
        quantization=plan.quantization if plan else "",
        runtime=plan.runtime if plan else "",
        gpu_product=plan.gpuProduct if plan else None,
        fallback=bool(status.fallback and status.fallback.inForce),
        slo_ttft_s=spec.slo.ttft_seconds if spec else None,
        slo_tpot_s=spec.slo.tpot_seconds if spec else None,
        predicted_ttft_s=plan.predicted.ttftSeconds if plan else None,
        predicted_tpot_s=plan.predicted.tpotSeconds if plan else None,
        replicas_desired=spec.replicas if spec else 0,
        replicas_ready=status.readyReplicas or 0,
    )
    if state.observer is not None:
        seen = status.observed
        met = next((c.status for c in status.conditions if c.type == SLO_MET), "Unknown")
        state.metrics.set_slo(
            key[0], key[1],
            observed_ttft_s=seen.ttftP95Seconds if seen else None,
            observed_tpot_s=seen.tpotP95Seconds if seen else None,
            requests_running=seen.requestsRunning if seen else None,
            requests_waiting=seen.requestsWaiting if seen else None,
            slo_met=None if met == "Unknown" else met == "True",
            statistic=seen.statistic if seen else None,
            corrections=[(c.variant, c.hardware, c.ttftFactor, c.tpotFactor) for c in status.corrections],
            draft_acceptance=seen.draftAcceptanceRate if seen else None)
