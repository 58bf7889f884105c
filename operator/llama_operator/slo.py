"""The SLO loop's judgement: from what was observed, whether the SLO is met, and what to do about it.

Pure: the pass (passes.py) hands `judge` the last status, the newest observation (observe.Observation),
the spec, the plan in force, the time and a way to ask whether n replicas fit; it gets back the
condition, the status to record, the replicas to run, the corrections the planner must use, the Events.
docs/slo-loop.md is the readable version. Rules:

* **No data, no action.** An observation with a problem (Prometheus down, a pod without metrics, stale
  or NaN series) or without traffic makes SLOMet Unknown (NoData, NoTraffic) and resets the breach
  timers: a breach must be seen, continuously, for the whole window before anything is done.
* **Hysteresis.** Latency is breached above the target by more than a margin (vLLM: more than
  `BREACH_SHARE` of requests over the target, its histogram's share, which is more robust than a p95
  interpolated in coarse buckets; llama.cpp: its mean above the target x (1 + `BREACH_MARGIN`)), met at
  or below the target (share at most `MET_SHARE`); in between, the previous verdict stands.
* **Sustained.** SLOMet turns False, with one SLOBreached Event, once a breach has lasted the window; an
  action needs the same, and the cooldown since the last action.
* **Load first.** Requests waiting, or running above what the replicas were planned for (slo.concurrency
  each), sustained: scale out to what the load needs, within spec.maxReplicas and the free capacity.
  The engine slower than predicted at the planned load: record observed over predicted as a correction
  of that variant on that hardware; the planner then judges the plan in force with it, and moves to
  the first rung that meets the SLO with corrected estimates, or, when none does, the phase is
  Degraded, naming observed versus predicted. Calm (SLO met, the load would fit in one replica fewer
  with headroom) for the calm window: scale in by one, never below spec.replicas.
* **Drafts that do not pay** (a plan decoding with a draft, spec.speculative.mode Auto; docs/speculative.md):
  accepted over drafted tokens below the plan's minAcceptanceRate (judged on enough drafted tokens, even when
  too few requests came to judge the latency on), or more requests per replica than its
  paysUpToConcurrency with no replica to add, for the window: drafts are turned off (an Event says why) and
  the planner walks the ladder without them; after the correction TTL they may be planned again. In mode On
  (whose draft is never turned off) the acceptance measured replaces the catalog's figure in the planner's
  predictions; in Auto it acts through DraftOff only: handed to the planner, it would fail the plan in force
  at once, without the window, and be forgotten as soon as a plan without the draft ran (nothing drafts to
  measure), so the draft would come back after the upgrade delay, and go again.
* **Observe mode** (spec.sloPolicy observe) reports the same and does nothing.
* **Forgetting.** A correction older than the correction TTL is dropped, so the planner may try the
  better variant again (after the upgrade delay, like any upgrade); if it is still slow, the next
  sustained breach measures it again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable

from .api import LlamaDeploymentSpec
from .candidate import plan_hardware
from .drafting import alpha_for_rate
from .drafts import MeasuredAcceptance
from .observe import MEAN_FROM_COUNTERS, Observation, format_window
from .planner import Corrections
from .status import ChosenPlan, Correction, LlamaDeploymentStatus, Observed, SLOState
from .units import format_seconds, format_time, parse_time

NORMAL, WARNING = "Normal", "Warning"
SLO_MET = "SLOMet"
#: vLLM: breached when more than this share of requests is over a target (a p95 target allows 5%)...
BREACH_SHARE = 0.10
#: ...and met again at or below this share.
MET_SHARE = 0.05
#: llama.cpp (means only): breached when the mean is above the target by more than this.
BREACH_MARGIN = 0.10
#: Load above the plan: running above concurrency x replicas by more than this, or requests waiting.
OVERLOAD_MARGIN = 0.10
WAITING_THRESHOLD = 0.5  # requests waiting, on average over the window
#: Scale in only when the load would fit in one replica fewer at this share of what it was planned for.
SCALE_IN_HEADROOM = 0.7
#: Corrections are kept between these bounds (a factor outside says the observation is broken, not the model).
MIN_FACTOR, MAX_FACTOR = 0.05, 100.0
MAX_CORRECTIONS = 64


@dataclass(frozen=True)
class SloSettings:
    """The loop's timing (`llama-operator run --slo-*`); docs/slo-loop.md says how to choose them."""

    window: timedelta = timedelta(minutes=5)
    cooldown: timedelta = timedelta(minutes=5)
    calm_window: timedelta = timedelta(minutes=15)
    correction_ttl: timedelta = timedelta(hours=24)
    #: The fewest requests in the window (output tokens for llama.cpp, which counts no requests) to judge
    #: on: a p95 of three requests is one request, and a correction measured on it is noise.
    min_samples: int = 20


@dataclass
class Judgement:
    """What the loop concluded in one pass."""

    condition: tuple[str, str, str]  # (status, reason, message) of SLOMet
    observed: Observed | None
    state: SLOState
    corrections: list[Correction]
    replicas: int
    events: list[tuple[str, str, str]] = field(default_factory=list)
    #: A correction recorded in this pass (the planner must re-judge the plan in force with it).
    corrected: Correction | None = None
    #: A sustained breach without a remedy here (at maxReplicas, no capacity), or the correction just
    #: recorded: observed against target and prediction, for the phase (Degraded) when nothing is left to try.
    breach_message: str | None = None
    action: str | None = None  # ScaledOut | ScaledIn | Replanned | DraftOff, for the metrics
    #: False: what was seen is close to what status shows (_worth_writing); a verdict that did not change
    #: keeps its message too, so a steady deployment's status is not rewritten every interval.
    observed_fresh: bool = True

    def planner_corrections(self) -> Corrections:
        return planner_corrections(self.corrections)

    @property
    def drafts_off(self) -> str | None:
        """Why drafts are off (the planner tries none), or None."""
        return self.state.draftsOff

    #: Per-token acceptance of the draft in force, from what was measured, for the planner to predict with (mode
    #: On only: in Auto a low acceptance acts through DraftOff, see the module's docstring).
    measured_acceptance: MeasuredAcceptance = field(default_factory=dict)


def planner_corrections(corrections: list[Correction]) -> Corrections:
    """status.corrections as the planner takes them: (variant, hardware) -> (TTFT factor, TPOT factor)."""
    return {(c.variant, c.hardware): (c.ttftFactor, c.tpotFactor) for c in corrections}


def _since(value: str | None, now: datetime) -> timedelta:
    return now - parse_time(value) if value else timedelta(0)


def _observed_status(obs: Observation) -> Observed:
    def r(v: float | None) -> float | None:
        return None if v is None else float(f"{v:.4g}")
    return Observed(
        ttftP95Seconds=r(obs.ttft_seconds), tpotP95Seconds=r(obs.tpot_seconds), statistic=obs.statistic,
        ttftOverTarget=r(obs.ttft_over_target), tpotOverTarget=r(obs.tpot_over_target),
        requestsRunning=r(obs.requests_running), requestsWaiting=r(obs.requests_waiting),
        requestsPerSecond=r(obs.requests_per_second), tokensPerSecond=r(obs.tokens_per_second),
        draftAcceptanceRate=r(obs.draft_acceptance_rate), draftedTokensPerSecond=r(obs.drafted_per_second),
        window=format_window(obs.window_seconds),
        source=obs.source, sampledAt=format_time(obs.sampled_at))


#: status.observed is rewritten when a figure moves by more than this share, or once a window has passed:
#: observing every interval does not mean a status write every interval (the API server's load).
OBSERVED_CHANGE = 0.10


def _worth_writing(before: Observed | None, new: Observed, now: datetime, window: timedelta) -> bool:
    """Whether `new` says something `before` (the status written) does not: a figure appeared, went or moved
    by more than OBSERVED_CHANGE, the source or statistic changed, or `before` is a window old."""
    if before is None or before.sampledAt is None or _since(before.sampledAt, now) >= window:
        return True
    for name, value in new:
        old = getattr(before, name)
        if name == "sampledAt":
            continue
        if isinstance(value, float) and isinstance(old, (int, float)):
            if abs(value - old) > OBSERVED_CHANGE * max(abs(old), abs(value)) and abs(value - old) > 1e-3:
                return True
        elif value != old:
            return True
    return False


def _latency(obs: Observation, spec: LlamaDeploymentSpec) -> tuple[bool, bool, str]:
    """(surely breached, surely met, what was seen against the targets). Neither: too close to call."""
    t_ttft, t_tpot = spec.slo.ttft_seconds, spec.slo.tpot_seconds
    word = "mean" if obs.statistic == MEAN_FROM_COUNTERS else "p95"
    parts = []
    for name, value, target, text in (("TTFT", obs.ttft_seconds, t_ttft, spec.slo.ttftP95),
                                      ("TPOT", obs.tpot_seconds, t_tpot, spec.slo.tpotP95)):
        if value is not None:
            parts.append(f"{name} {word} {format_seconds(value)} (target {text})")
    bounds = [b for b in (obs.ttft_over_bounds, obs.tpot_over_bounds) if b is not None]
    if bounds:  # vLLM's histograms: the share of requests over the target decides, as far as the buckets know it
        at_least, at_most = max(b[0] for b in bounds), max(b[1] for b in bounds)
        share = f"{at_least:.0%}" if at_least == at_most else f"between {at_least:.0%} and {at_most:.0%}"
        seen = "; ".join(parts) + f"; {share} of requests over a target"
        return at_least > BREACH_SHARE, at_most <= MET_SHARE, seen
    ratios = [v / t for v, t in ((obs.ttft_seconds, t_ttft), (obs.tpot_seconds, t_tpot)) if v is not None]
    worst = max(ratios) if ratios else 0.0
    return worst > 1 + BREACH_MARGIN, worst <= 1.0, "; ".join(parts)


def _load(obs: Observation, concurrency: int, replicas: int) -> tuple[float, bool, str]:
    """(requests in the deployment, overloaded, how it compares with the plan)."""
    running = obs.requests_running or 0.0
    waiting = obs.requests_waiting or 0.0
    planned = concurrency * replicas
    overloaded = waiting > WAITING_THRESHOLD or running > planned * (1 + OVERLOAD_MARGIN)
    text = (f"{running:.3g} requests running and {waiting:.3g} waiting for {planned} planned "
            f"(concurrency {concurrency} x {replicas} replica(s))")
    return running + waiting, overloaded, text


def _samples(obs: Observation) -> int:
    """What the window's figures rest on: requests (vLLM), or output tokens (llama.cpp counts no requests)."""
    rate = obs.requests_per_second if obs.requests_per_second is not None else obs.tokens_per_second or 0.0
    return int(rate * obs.window_seconds)


def _fresh_corrections(status: LlamaDeploymentStatus, now: datetime, ttl: timedelta) -> list[Correction]:
    return [c for c in status.corrections if now - parse_time(c.updatedAt) < ttl][-MAX_CORRECTIONS:]


def _correct(corrections: list[Correction], plan: ChosenPlan, obs: Observation, now: datetime) -> Correction:
    """The correction of the plan in force from this observation: its factor so far times observed over
    predicted (the prediction in force already includes the factor so far)."""
    applied = plan.predicted.correctedBy
    old = (applied.ttftFactor, applied.tpotFactor) if applied else (1.0, 1.0)

    def factor(before: float, seen: float | None, predicted: float) -> float:
        if seen is None or predicted <= 0 or not math.isfinite(seen):
            return before
        return float(f"{min(MAX_FACTOR, max(MIN_FACTOR, before * seen / predicted)):.3g}")

    variant, hardware = plan.variant, plan_hardware(plan)
    samples = _samples(obs)
    previous = next((c for c in corrections if c.variant == variant and c.hardware == hardware), None)
    new = Correction(variant=variant, hardware=hardware,
                     ttftFactor=factor(old[0], obs.ttft_seconds, plan.predicted.ttftSeconds),
                     tpotFactor=factor(old[1], obs.tpot_seconds, plan.predicted.tpotSeconds),
                     samples=samples + (previous.samples if previous else 0), updatedAt=format_time(now))
    corrections[:] = [c for c in corrections if c is not previous] + [new]
    return new


def judge(status: LlamaDeploymentStatus, obs: Observation | None, spec: LlamaDeploymentSpec, now: datetime,
          settings: SloSettings, fits: Callable[[int], bool]) -> Judgement:
    """The SLO verdict and action for one pass; `fits(n)`: whether n replicas of the plan in force fit."""
    prev = status.slo or SLOState()
    replicas = min(max(prev.replicas or spec.replicas, spec.replicas), spec.max_replicas)
    corrections = _fresh_corrections(status, now, settings.correction_ttl)
    state = SLOState(replicas=replicas if replicas != spec.replicas else None, lastAction=prev.lastAction,
                     lastActionAt=prev.lastActionAt)
    if prev.draftsOff and prev.draftsOffAt and _since(prev.draftsOffAt, now) < settings.correction_ttl:
        state.draftsOff, state.draftsOffAt = prev.draftsOff, prev.draftsOffAt  # (forgotten after the TTL)
    plan = status.plan
    before = next((c for c in status.conditions if c.type == SLO_MET), None)

    def unknown(reason: str, message: str, observed: Observed | None = None, calm: bool = False) -> Judgement:
        j = Judgement(("Unknown", reason, message), observed, state, corrections, replicas)
        if calm:  # no traffic, or too little to judge: the replicas scaled out for a load that went may go,
            # counting the requests still running and waiting (a few slow ones are load all the same)
            state.calmSince = prev.calmSince or format_time(now)
            load = (obs.requests_running or 0.0) + (obs.requests_waiting or 0.0) if obs is not None else 0.0
            _maybe_scale_in(j, spec, prev, now, settings, load, message)
        return j

    if plan is None:
        return unknown("NoPlan", "Nothing runs yet")
    if obs is None:
        return unknown("NoData", "Not observed yet")
    if obs.problem:
        return unknown("NoData", obs.problem)
    observed = _observed_status(obs)
    fresh = _worth_writing(status.observed, observed, now, settings.window)
    if not fresh:
        observed = status.observed
    if not obs.traffic:
        return unknown("NoTraffic", f"No requests in the last {observed.window}; latency unknown", observed,
                       calm=True)
    # After an action the window still holds what ran before it (the old pods, the old replicas): a breach
    # or an overload is only counted once the window is clear of it.
    settling = prev.lastActionAt is not None and _since(prev.lastActionAt, now) < settings.window
    cooling = prev.lastActionAt is not None and _since(prev.lastActionAt, now) < settings.cooldown
    samples = _samples(obs)
    if samples < settings.min_samples:
        what = "requests" if obs.requests_per_second is not None else "output tokens"
        j = unknown("FewSamples", f"Only {samples} {what} in the last {observed.window}; at least "
                    f"{settings.min_samples} are needed to judge the latency", observed, calm=True)
        # The draft's acceptance rests on drafted tokens (_enough_drafted), which a few long requests give plenty
        # of: at one request per replica, where drafts pay, requests are few. It is judged all the same.
        unpaid = _judge_draft(j, obs, plan, spec, replicas, prev, now, settings, settling)
        if unpaid and unpaid[0] == "acceptance" and j.action is None and spec.sloPolicy == "enforce" \
                and not cooling:
            _draft_off(j, plan, unpaid[1], now, settings)
        return j

    breached_now, met_now, seen = _latency(obs, spec)
    total, overloaded, load_text = _load(obs, spec.slo.concurrency, replicas)
    was_breached = before is not None and before.status == "False"
    # Hysteresis: a breach starts only when it is sure, and lasts until the SLO is surely met again. An action
    # ends the breach it answered: the next one must be seen afresh, of what runs after it.
    breached = breached_now or (prev.breachedSince is not None and not met_now)
    state.breachedSince = (prev.breachedSince or format_time(now)) if breached and not settling else None
    state.overloadedSince = (prev.overloadedSince or format_time(now)) if overloaded and not settling else None
    sustained = state.breachedSince is not None and _since(state.breachedSince, now) >= settings.window
    j = Judgement(("True", "Met", f"Met: {seen}; {load_text}"), observed, state, corrections, replicas,
                  observed_fresh=fresh)
    if not breached and not met_now:  # too close to call: the verdict so far stands, or none is given
        kept = before is not None and before.status == "True"
        j.condition = ("True", "Met", f"Met before, now too close to call: {seen}; {load_text}") if kept else \
            ("Unknown", "NearTarget", f"Too close to the target to call: {seen}; {load_text}")
    elif breached and not sustained and settling:
        j.condition = (before.status if before is not None else "Unknown",
                       before.reason if before is not None else "Settling",
                       f"Settling after {prev.lastAction}: {seen}; {load_text}")
    elif breached and not sustained:
        j.condition = (before.status if before is not None else "Unknown",
                       before.reason if before is not None else "Breaching",
                       f"Above target for {int(_since(state.breachedSince, now).total_seconds())}s "
                       f"(acting after {int(settings.window.total_seconds())}s): {seen}; {load_text}")
    elif sustained:
        j.condition = ("False", "Breached", f"Breached: {seen}; {load_text}")
        if not was_breached:
            j.events.append((WARNING, "SLOBreached", f"SLO breached for {int(settings.window.total_seconds())}s: "
                             f"{seen}; {load_text}"))
    if not breached and not overloaded:
        state.calmSince = prev.calmSince or format_time(now)
    unpaid = _judge_draft(j, obs, plan, spec, replicas, prev, now, settings, settling)
    if spec.sloPolicy != "enforce" or cooling:
        return j
    if unpaid and unpaid[0] == "acceptance":  # the draft costs more than it saves, whatever the load
        _draft_off(j, plan, unpaid[1], now, settings)
        return j
    if overloaded and _since(state.overloadedSince, now) >= settings.window:
        why_not = _scale_out(j, spec, total, load_text, now, fits)
        if why_not is not None and unpaid:  # more load than the draft pays at, and no replica to add
            _draft_off(j, plan, f"{unpaid[1]}, and no replica could be added ({why_not})", now, settings)
        elif why_not is not None and sustained:  # the latency breach comes with more load than can be served
            j.breach_message = f"SLO breached: {seen}; {load_text}; {why_not}"
        return j
    if sustained and not overloaded:  # the engine is slower than predicted at the planned load
        corrected = _correct(corrections, plan, obs, now)
        j.corrected = corrected
        j.action = "Replanned"
        state.lastAction, state.lastActionAt = "Replanned", format_time(now)
        state.breachedSince = None  # a breach after this is the corrected plan's
        j.breach_message = (f"SLO breached: {seen}; predicted TTFT {format_seconds(plan.predicted.ttftSeconds)}, "
                            f"TPOT {format_seconds(plan.predicted.tpotSeconds)}: {plan.variant} on "
                            f"{corrected.hardware} runs at {corrected.ttftFactor:g}x (TTFT) and "
                            f"{corrected.tpotFactor:g}x (TPOT) the estimate")
        return j
    if not sustained:
        _maybe_scale_in(j, spec, prev, now, settings, total, f"SLO met: {seen}")
    return j


def _judge_draft(j: Judgement, obs: Observation, plan: ChosenPlan, spec: LlamaDeploymentSpec, replicas: int,
                 prev: SLOState, now: datetime, settings: SloSettings, settling: bool) -> tuple[str, str] | None:
    """The draft in force: its measured acceptance (for the planner, mode On only: see the module's docstring),
    since when it has not paid; why it does not pay once that has lasted the window, else None."""
    measured = _measured_acceptance(obs, plan, settings)
    j.measured_acceptance = measured if spec.speculative.mode == "On" else {}
    unpaid = _draft_unpaid(obs, plan, spec, replicas, measured, settings)
    j.state.draftUnpaidSince = (prev.draftUnpaidSince or format_time(now)) if unpaid and not settling else None
    sustained = j.state.draftUnpaidSince is not None and _since(j.state.draftUnpaidSince, now) >= settings.window
    return unpaid if sustained else None


def _enough_drafted(obs: Observation, plan: ChosenPlan, settings: SloSettings) -> bool:
    """Whether the window drafted enough to judge the acceptance on: min_samples drafting steps' worth (the draft
    length times the loop's min_samples), since a rate over a handful of drafts is noise."""
    assert plan.speculative is not None
    drafted = (obs.drafted_per_second or 0.0) * obs.window_seconds
    return drafted >= settings.min_samples * plan.speculative.numSpeculativeTokens


def _measured_acceptance(obs: Observation, plan: ChosenPlan | None, settings: SloSettings) -> MeasuredAcceptance:
    """The per-token acceptance of the draft in force, from accepted over drafted tokens at its draft length
    (drafting.alpha_for_rate); empty without a draft or without enough drafted tokens to say."""
    if plan is None or plan.speculative is None or obs.draft_acceptance_rate is None \
            or not _enough_drafted(obs, plan, settings):
        return {}
    s = plan.speculative
    # two decimals: a prediction refreshed on every reading would rewrite status on every pass
    return {(plan.model, s.draftModel): round(alpha_for_rate(obs.draft_acceptance_rate, s.numSpeculativeTokens), 2)}


def _draft_unpaid(obs: Observation, plan: ChosenPlan | None, spec: LlamaDeploymentSpec, replicas: int,
                  measured: MeasuredAcceptance, settings: SloSettings) -> tuple[str, str] | None:
    """Why the draft in force does not pay, ("acceptance" | "load", what was seen); None when it does, when there
    is none, or when the mode is not Auto (On keeps its draft; the loop only reports). Servers that wrote tokens
    and drafted none are not drafting (llama.cpp drops a draft whose vocabulary it refuses, and serves on):
    the gain planned is not there."""
    if plan is None or plan.speculative is None or spec.speculative.mode != "Auto":
        return None
    s = plan.speculative
    written = (obs.tokens_per_second or 0.0) * obs.window_seconds
    if obs.drafted_per_second == 0 and written >= settings.min_samples * s.numSpeculativeTokens:
        return ("acceptance", f"the servers wrote {written:.0f} tokens and drafted none: the {s.draftModel} draft "
                "is not in use (an engine drops a draft it cannot load or whose vocabulary it refuses)")
    if measured and s.minAcceptanceRate is not None and obs.draft_acceptance_rate is not None \
            and obs.draft_acceptance_rate < s.minAcceptanceRate:
        return ("acceptance", f"{obs.draft_acceptance_rate:.0%} of drafted tokens were accepted, below the "
                f"{s.minAcceptanceRate:.0%} at which the {s.draftModel} draft gains what it costs at concurrency "
                f"{spec.slo.concurrency} (predicted {s.predictedSpeedup:g}x at {s.acceptance:g} per token)")
    per_replica = (obs.requests_running or 0.0) / max(1, replicas)
    if s.paysUpToConcurrency is not None and per_replica > s.paysUpToConcurrency:
        return ("load", f"{per_replica:.3g} requests run per replica, more than the {s.paysUpToConcurrency} up to "
                f"which the {s.draftModel} draft pays")
    return None


def _draft_off(j: Judgement, plan: ChosenPlan, why: str, now: datetime, settings: SloSettings) -> None:
    """Turn drafts off (the planner re-plans without them in this pass), with the Event saying why."""
    assert plan.speculative is not None
    hours = settings.correction_ttl.total_seconds() / 3600
    j.events.append((WARNING, "DraftOff", f"Turning the {plan.speculative.draftModel} draft off: {why}; planning "
                     f"without drafts for {hours:g}h"))
    j.action = "DraftOff"
    j.state.draftsOff, j.state.draftsOffAt = why, format_time(now)
    j.state.draftUnpaidSince = None
    j.state.lastAction, j.state.lastActionAt = "DraftOff", format_time(now)


def _scale_out(j: Judgement, spec: LlamaDeploymentSpec, total: float, load_text: str, now: datetime,
               fits: Callable[[int], bool]) -> str | None:
    """Scale out to the replicas the load needs (at most maxReplicas, and what fits); None when it did,
    else why it could not."""
    needed = min(spec.max_replicas, max(j.replicas + 1, math.ceil(total / spec.slo.concurrency)))
    target = next((n for n in range(needed, j.replicas, -1) if fits(n)), None)
    if target is None:
        return f"at spec.maxReplicas {spec.max_replicas}" if j.replicas >= spec.max_replicas else \
            "no free capacity for another replica"
    _scale(j, spec, "ScaledOut", target, now, f"Load above the plan for the window: {load_text}; scaling out "
           f"from {j.replicas} to {target} replica(s) (maxReplicas {spec.max_replicas})")
    return None


def _scale(j: Judgement, spec: LlamaDeploymentSpec, action: str, replicas: int, now: datetime, message: str) -> None:
    """Record a scaling: the replicas, the Event, the action and when (the cooldown's start); the timers that
    led to it start again."""
    j.events.append((NORMAL, action, message))
    j.replicas = replicas
    j.action = action
    j.state.replicas = replicas if replicas != spec.replicas else None
    j.state.lastAction, j.state.lastActionAt = action, format_time(now)
    j.state.overloadedSince = None
    j.state.calmSince = None


def _maybe_scale_in(j: Judgement, spec: LlamaDeploymentSpec, prev: SLOState, now: datetime, settings: SloSettings,
                    total: float, seen: str) -> None:
    """One replica fewer once the load would fit in it with headroom, calm for the calm window; `seen`: the
    latency observed against the targets (or why there is none), for the Event."""
    if j.replicas <= spec.replicas or spec.sloPolicy != "enforce":
        return
    if prev.lastActionAt and _since(prev.lastActionAt, now) < settings.cooldown:
        return
    fewer = j.replicas - 1
    if total > spec.slo.concurrency * fewer * SCALE_IN_HEADROOM:
        j.state.calmSince = None
        return
    if j.state.calmSince is None or _since(j.state.calmSince, now) < settings.calm_window:
        return
    _scale(j, spec, "ScaledIn", fewer, now, f"Calm for {int(settings.calm_window.total_seconds())}s ({seen}): "
           f"{total:.3g} requests fit in {fewer} replica(s) (concurrency {spec.slo.concurrency} each); "
           f"scaling in from {j.replicas}")
