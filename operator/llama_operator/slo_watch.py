"""The SLO loop's clock: every interval, observe every deployment that runs a plan, then wake its pass.

The observation (observer.Observer: one Prometheus query per signal for all deployments, or a bounded
scrape of the pods' /metrics) is kept in the state; the pass judges it (slo.judge) and writes status,
so the status has one writer. A deployment's model pods come from a kopf index of the operator's pods
(handlers.py: their IP, port and readiness).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from .observe import Target
from .ownership import LABEL_DEPLOYMENT, LABEL_RUNTIME, PORTS
from .state import Key, OperatorState

log = logging.getLogger("llama_operator")


def targets(state: OperatorState) -> list[Target]:
    """The deployments with a plan in force (their promise: the spec and the plan the pass decided)."""
    out = []
    for (namespace, name), promise in state.promises.items():
        if (namespace, name) not in state.bodies:
            continue
        slo = promise.spec.slo
        out.append(Target(namespace=namespace, name=name, runtime=promise.plan.runtime, engine=promise.plan.engine,
                          ttft_target_seconds=slo.ttft_seconds, tpot_target_seconds=slo.tpot_seconds,
                          prompt_tokens=slo.promptTokens, drafting=promise.plan.speculative is not None))
    return out


def model_pod(namespace: str, name: str, body: Mapping[str, Any], labels: Mapping[str, str]):
    """A model server pod as the pod scraper reaches it (observer.PodEndpoint), or None: not one of the
    operator's, or no IP yet."""
    from .observer import PodEndpoint

    owner = labels.get(LABEL_DEPLOYMENT)
    status = body.get("status") or {}
    ip = status.get("podIP")
    if not owner or not ip:
        return None
    runtime = labels.get(LABEL_RUNTIME, "")
    port = PORTS.get(runtime)
    for container in (body.get("spec") or {}).get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == "http" and p.get("containerPort"):
                port = int(p["containerPort"])
    if port is None:
        return None
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return PodEndpoint(namespace=namespace, pod=name, deployment=owner, ip=ip, port=port, ready=ready)


def _pods_by_deployment(state: OperatorState) -> dict[Key, list]:
    index = state.indexes.model_pods if state.indexes is not None else None
    out: dict[Key, list] = {}
    for _, store in (index.items() if index is not None else ()):
        for pod in store:
            out.setdefault((pod.namespace, pod.deployment), []).append(pod)
    return out


async def observe_once(state: OperatorState) -> int:
    """Observe every deployment with a plan once and wake their passes; how many were observed."""
    wanted = targets(state)
    observations = await state.observer.collect(wanted, _pods_by_deployment(state))
    for key in [k for k in state.observations if k not in observations]:
        state.observations.pop(key, None)
    state.observations.update(observations)
    state.wake(observations)
    return len(observations)


async def observe_forever(state: OperatorState) -> None:
    """The loop: observe, wake, wait for the interval (measured from the start of each round)."""
    interval = state.settings.slo_interval_seconds
    log.info("SLO loop: %s, every %gs", state.observer.describe(), interval)
    while True:
        if state.peering is not None:
            await state.peering.wait()  # a replica that peering pauses neither scrapes nor queries
        started = time.monotonic()
        try:
            await observe_once(state)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a broken round must not end the loop; the next one tries again
            log.exception("SLO loop: observing failed; trying again in %gs", interval)
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
