"""Where the SLO loop's observations come from: a Prometheus server, or the model servers' own /metrics.

The kopf shell's side of observe.py: this module does the I/O (asyncio, aiohttp, which kopf brings) and
keeps what must outlive one pass (the pods' recent scrapes); observe.py turns what was read into
Observations. Either source answers for every target, every time: what could not be read becomes an
Observation whose `problem` says what and where (a URL, a pod), never an exception, because the loop then
reports SLOMet Unknown and acts on nothing.

* PrometheusSource asks a Prometheus server that scrapes the model servers (the chart's PodMonitors add
  the `namespace` and `llamadeployment` labels) one query per signal for all deployments at once, so its
  load on Prometheus does not grow with the number of deployments.
* PodScraper reads each ready pod's /metrics itself (no Prometheus needed) and keeps a short history per
  pod to take rates from.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Protocol

import aiohttp

from . import engines
from .observe import (
    MAX_EXPOSITION_BYTES, Observation, Rates, Scrape, Target, format_window, gauges_of, observation,
    parse_exposition, rates_between, relevant, sum_rates,
)

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, LlamaDeployment name)


@dataclass(frozen=True)
class PodEndpoint:
    """One model-server pod of a deployment, where its /metrics is served."""

    namespace: str
    pod: str
    deployment: str
    ip: str
    port: int
    ready: bool


class Source(Protocol):
    name: str  # Observation.source: prometheus | pods

    def describe(self) -> str: ...

    async def collect(self, targets: list[Target], pods: Mapping[Key, list[PodEndpoint]],
                      window_seconds: float) -> dict[Key, Observation]: ...


class FetchError(Exception):
    """A GET that gave no usable body; the message says why, in words a status line can carry."""


async def _get(session: aiohttp.ClientSession, url: str, *, headers: Mapping[str, str], params=None,
               timeout: float, max_bytes: int) -> tuple[int, bytes]:
    """(status, body) of one GET, within `timeout` seconds all told and at most `max_bytes` of body (a
    bigger one is refused unread: it is no model server's, nor an answer worth the memory)."""
    async def fetch() -> tuple[int, bytes]:
        async with session.get(url, headers=headers, params=params, allow_redirects=False) as response:
            if response.content_length is not None and response.content_length > max_bytes:
                raise FetchError(f"a body of {response.content_length} bytes, over the {max_bytes}-byte cap")
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > max_bytes:
                    raise FetchError(f"a body over the {max_bytes}-byte cap")
            return response.status, bytes(body)

    try:
        return await asyncio.wait_for(fetch(), timeout)
    except asyncio.TimeoutError:
        raise FetchError(f"no answer within {timeout:g} s") from None
    except aiohttp.ClientConnectorError as exc:
        raise FetchError(f"cannot connect: {exc.os_error or exc}") from None
    except aiohttp.ClientError as exc:
        raise FetchError(f"{type(exc).__name__}: {exc}") from None


def _session(concurrency: int) -> aiohttp.ClientSession:
    # No proxy from the environment (a pod IP is never behind one); connections closed after each answer,
    # so nothing lingers between intervals.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency, force_close=True),
                                 trust_env=False, timeout=aiohttp.ClientTimeout(total=None))


def _sampled_at() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


# --- The pods' own /metrics -------------------------------------------------------------------------------

#: What a scrape asks for: the text format both engines serve (never OpenMetrics, whose names differ).
EXPOSITION_ACCEPT = "text/plain;version=0.0.4"
#: Scrapes kept per pod at most, whatever the window and interval (memory stays bounded).
MAX_HISTORY = 64


class PodScraper:
    """Reads each ready pod's /metrics, at most `concurrency` at once and `timeout_seconds` each, and takes
    rates from each pod's scrapes over the window: from the last one at or before the window's start (or
    the oldest kept, if younger) to the newest, so an interval equal to the window still spans it."""

    name = "pods"

    def __init__(self, *, concurrency: int = 16, timeout_seconds: float = 2.0,
                 max_body_bytes: int = MAX_EXPOSITION_BYTES, clock=time.monotonic):
        self.concurrency = concurrency
        self.timeout_seconds = timeout_seconds
        self.max_body_bytes = max_body_bytes
        self._clock = clock
        self._history: dict[Key, list[tuple[float, Scrape]]] = {}  # (namespace, pod) -> (when, scrape)

    def describe(self) -> str:
        return f"the pods' /metrics (at most {self.concurrency} at once, {self.timeout_seconds:g} s each)"

    async def collect(self, targets: list[Target], pods: Mapping[Key, list[PodEndpoint]],
                      window_seconds: float) -> dict[Key, Observation]:
        sampled_at = _sampled_at()
        listed = {(p.namespace, p.pod) for endpoints in pods.values() for p in endpoints}
        for gone in set(self._history) - listed:
            del self._history[gone]
        to_scrape = [(p, signals) for t in targets if (signals := _signals(t)) is not None
                     for p in pods.get((t.namespace, t.name), []) if p.ready]
        semaphore = asyncio.Semaphore(self.concurrency)
        async with _session(self.concurrency) as session:
            results = await asyncio.gather(*(self._scrape(session, semaphore, p, s) for p, s in to_scrape))
        scraped = {(p.namespace, p.pod): result for (p, _), result in zip(to_scrape, results)}
        out = {}
        for t in targets:
            ready = [p for p in pods.get((t.namespace, t.name), []) if p.ready]
            out[(t.namespace, t.name)] = self._observe(t, ready, scraped, window_seconds, sampled_at)
        return out

    async def _scrape(self, session: aiohttp.ClientSession, semaphore: asyncio.Semaphore, pod: PodEndpoint,
                      signals: engines.SloSignals) -> tuple[float, Scrape] | str:
        """(when, what of the release's series) one pod's /metrics said, or why it said nothing usable. Parsed
        in a thread: a large body must not hold up the operator's event loop."""
        host = f"[{pod.ip}]" if ":" in pod.ip else pod.ip
        async with semaphore:
            try:
                status, body = await _get(session, f"http://{host}:{pod.port}/metrics",
                                          headers={"Accept": EXPOSITION_ACCEPT}, timeout=self.timeout_seconds,
                                          max_bytes=self.max_body_bytes)
            except FetchError as exc:
                return str(exc)
            when = self._clock()
        if status != 200:
            return f"HTTP {status} from /metrics"
        scrape = await asyncio.to_thread(parse_exposition, body.decode("utf-8", errors="replace"))
        return when, relevant(scrape, signals)

    def _observe(self, target: Target, ready: list[PodEndpoint], scraped: Mapping[Key, tuple[float, Scrape] | str],
                 window_seconds: float, sampled_at: datetime) -> Observation:
        def unseen(problem: str | None) -> Observation:
            return observation(target, None, source=self.name, sampled_at=sampled_at, problem=problem,
                               window_seconds=window_seconds)

        signals = _signals(target)
        deployment = f"{target.namespace}/{target.name}"
        if signals is None:
            return unseen(None)  # observation() names the unknown release
        if not ready:
            return unseen(f"no ready pod of {deployment} to scrape")
        per_pod, failures = [], []
        for pod in ready:
            result = scraped[(pod.namespace, pod.pod)]
            if isinstance(result, str):
                failures.append(f"{pod.pod} ({pod.ip}:{pod.port}): {result}")
                continue
            history = self._remember((pod.namespace, pod.pod), result, window_seconds)
            (first, oldest), (last, newest) = history[0], history[-1]
            if last > first:
                per_pod.append(rates_between(oldest, newest, last - first, signals))
            else:  # scraped once so far: its gauges count, its counters have no rate yet
                per_pod.append(Rates(window_seconds=0.0, gauges=gauges_of(newest, signals), pods=1))
        if failures and not per_pod:
            return unseen(f"no pod of {deployment} answered on /metrics: {'; '.join(failures)}")
        if not any(r.window_seconds for r in per_pod):
            return unseen(f"{deployment}'s pods were scraped once so far: rates need a second scrape")
        total = sum_rates(per_pod)
        total.window_seconds = window_seconds
        return observation(target, total, source=self.name, sampled_at=sampled_at)

    def _remember(self, pod: Key, scrape: tuple[float, Scrape], window_seconds: float) -> list[tuple[float, Scrape]]:
        """The pod's scrapes with this one, pruned to the window (and the one just before its start)."""
        history = self._history.setdefault(pod, [])
        history.append(scrape)
        start = scrape[0] - window_seconds
        before = [i for i, (when, _) in enumerate(history) if when <= start]
        if before:
            del history[:before[-1]]
        del history[:-MAX_HISTORY]
        return history


def _signals(target: Target) -> engines.SloSignals | None:
    release = engines.release(target.engine) if target.engine else None
    return release.slo_signals if release is not None and release.engine == target.runtime else None


# --- A Prometheus server ----------------------------------------------------------------------------------

#: The signals the loop reads, each with how Prometheus reduces it per deployment.
_ROLES = {
    "ttft": "buckets", "tpot": "buckets",
    "generated_tokens": "rate", "prompt_seconds": "rate", "prompt_tokens": "rate",
    "predicted_seconds": "rate", "predicted_tokens": "rate",
    "running": "gauge", "waiting": "gauge",
    "draft_tokens": "rate", "draft_accepted": "rate",
}
#: Read only for deployments whose plan has a draft: no query for them otherwise.
_DRAFT_ROLES = ("draft_tokens", "draft_accepted")
_BY = "namespace, llamadeployment"
#: Largest answer read: a bucket series per deployment and bound is some 200 bytes of JSON.
MAX_ANSWER_BYTES = 32 * 1024 * 1024


def _role_query(kind: str, names: list[str], window: str) -> str:
    """One PromQL expression for a signal over all deployments. A signal spelt differently by two releases
    takes each name in catalog order (newest first), a later name only for deployments the earlier ones
    left out (`unless on`): a deployment mid-upgrade then reads one release's series, never buckets of
    two bucket layouts added together."""
    exprs = {
        "buckets": [f"sum by ({_BY}, le) (rate({n}_bucket[{window}]))" for n in names],
        "rate": [f"sum by ({_BY}) (rate({n}[{window}]))" for n in names],
        "gauge": [f"sum by ({_BY}) (avg_over_time({n}[{window}]))" for n in names],
        # Pods reporting: one series per pod first (vLLM's data-parallel engines each export the gauge).
        "pods": [f"count by ({_BY}) (count by ({_BY}, pod) (last_over_time({n}[{window}])))" for n in names],
    }[kind]
    return " or ".join(e if i == 0 else f"({e} unless on ({_BY}) ({' or '.join(exprs[:i])}))"
                       for i, e in enumerate(exprs))


def _roles(signals: engines.SloSignals, drafting: bool) -> list[str]:
    """The signals read for one deployment: those its release names, the draft's counters only while it drafts."""
    return [r for r in _ROLES if getattr(signals, r) and (drafting or r not in _DRAFT_ROLES)]


def _names(role: str) -> list[str]:
    """Every name the catalog's releases give a signal, in catalog order, once each."""
    return list(dict.fromkeys(n for r in engines.releases() if (n := getattr(r.slo_signals, role))))


class PrometheusSource:
    """The Prometheus HTTP API: per collect, one instant query per signal the targets' releases use (and one
    for the pods reporting), whatever the number of deployments. `queries_sent` counts them."""

    name = "prometheus"

    def __init__(self, url: str, bearer_token_file: str | None = None, timeout: float = 5.0):
        self.url = url.rstrip("/")
        self.bearer_token_file = bearer_token_file
        self.timeout = timeout
        self.queries_sent = 0

    def describe(self) -> str:
        return f"Prometheus at {self.url}"

    async def collect(self, targets: list[Target], pods: Mapping[Key, list[PodEndpoint]],
                      window_seconds: float) -> dict[Key, Observation]:
        sampled_at = _sampled_at()
        known = {(t.namespace, t.name): s for t in targets if (s := _signals(t)) is not None}
        roles = sorted({role for t in targets if (s := known.get((t.namespace, t.name))) is not None
                        for role in _roles(s, t.drafting)})
        answers: dict[str, dict | str] = {}
        if roles:
            try:
                headers = self._headers()
            except OSError as exc:
                answers = dict.fromkeys(roles + ["pods"], f"cannot read the bearer token file: {exc}")
            else:
                window = format_window(window_seconds)
                queries = {role: _role_query(_ROLES[role], _names(role), window) for role in roles}
                queries["pods"] = _role_query("pods", _names("running"), window)
                # One evaluation instant for every query of a collect: a ratio of two queries (the draft's
                # acceptance) would otherwise mix windows that end a few milliseconds apart.
                evaluated_at = f"{time.time():.3f}"
                async with _session(len(queries)) as session:
                    results = await asyncio.gather(*(
                        self._query(session, headers, query, evaluated_at=evaluated_at,
                                    by_le=_ROLES.get(role) == "buckets", window_seconds=window_seconds)
                        for role, query in queries.items()))
                answers = dict(zip(queries, results))
        return {(t.namespace, t.name): self._observe(t, known.get((t.namespace, t.name)), answers, window_seconds,
                                                     sampled_at) for t in targets}

    def _headers(self) -> dict[str, str]:
        """Read on every collect, so a rotated token is used from the next interval on."""
        headers = {"Accept": "application/json"}
        if self.bearer_token_file:
            headers["Authorization"] = f"Bearer {Path(self.bearer_token_file).read_text().strip()}"
        return headers

    async def _query(self, session: aiohttp.ClientSession, headers: Mapping[str, str], query: str, *,
                     evaluated_at: str, by_le: bool, window_seconds: float) -> dict | str:
        """{(namespace, deployment): value, or {le: value}} from one instant query; or why there is none."""
        self.queries_sent += 1
        try:
            status, body = await _get(session, f"{self.url}/api/v1/query", headers=headers,
                                      params={"query": query, "time": evaluated_at}, timeout=self.timeout,
                                      max_bytes=MAX_ANSWER_BYTES)
        except FetchError as exc:
            return str(exc)
        try:
            answer = json.loads(body)
        except ValueError:
            return f"HTTP {status}, and not JSON: {body[:200].decode('utf-8', errors='replace')!r}"
        if not isinstance(answer, dict):
            return f"HTTP {status}, an answer that is not a JSON object"
        if answer.get("status") != "success":
            return f"HTTP {status}: {answer.get('errorType', 'error')}: {answer.get('error', 'no error given')}"
        data = answer.get("data") or {}
        if data.get("resultType") != "vector":
            return f"a {data.get('resultType')!r} result where an instant vector was asked for"
        return _per_deployment(data.get("result") or [], by_le, window_seconds)

    def _observe(self, target: Target, signals: engines.SloSignals | None, answers: Mapping[str, dict | str],
                 window_seconds: float, sampled_at: datetime) -> Observation:
        key = (target.namespace, target.name)
        where = f"Prometheus {self.url}"
        if signals is None:
            return observation(target, None, source=self.name, sampled_at=sampled_at, window_seconds=window_seconds)
        for role in _roles(signals, target.drafting) + ["pods"]:
            if isinstance(answers[role], str):
                return observation(target, None, source=self.name, sampled_at=sampled_at,
                                   window_seconds=window_seconds, problem=f"{where}: {answers[role]}")
        pods = answers["pods"].get(key, 0.0)
        rates = Rates(window_seconds=window_seconds, pods=int(pods) if math.isfinite(pods) else 0)
        for role in _roles(signals, target.drafting):
            kind, name = _ROLES[role], getattr(signals, role)
            if key in answers[role]:
                into = {"buckets": rates.buckets, "rate": rates.counters, "gauge": rates.gauges}[kind]
                into[name] = answers[role][key]
        seen = observation(target, rates, source=self.name, sampled_at=sampled_at)
        if seen.problem is None:
            return seen
        return dataclasses.replace(seen, problem=f"{where}: {seen.problem}")


def _per_deployment(result: list, by_le: bool, window_seconds: float) -> dict | str:
    """An instant vector by (namespace, llamadeployment) -> {key: value}, or by (namespace, llamadeployment,
    le) -> {key: {le: value}}; or why it is unusable (a sample older than the window is stale: it is not
    about the window)."""
    out: dict = {}
    now = time.time()
    for sample in result:
        labels = sample.get("metric") if isinstance(sample, dict) else None
        if isinstance(labels, dict) and not (labels.get("namespace") and labels.get("llamadeployment")):
            continue  # a model server the operator does not run (no PodMonitor relabelling): not ours to judge
        try:
            stamp, text = sample["value"]
            key, value, stamp = (labels["namespace"], labels["llamadeployment"]), float(text), float(stamp)
            le = float(labels["le"]) if by_le else None
        except (KeyError, TypeError, ValueError):
            wanted = "le and a value" if by_le else "a value"
            return f"a sample without {wanted}: {str(sample)[:200]}"
        if now - stamp > window_seconds:
            return (f"stale data: a sample of {datetime.fromtimestamp(stamp, timezone.utc):%Y-%m-%dT%H:%M:%SZ}, "
                    f"{now - stamp:.0f} s old, older than the {format_window(window_seconds)} window")
        if le is None:
            out[key] = out.get(key, 0.0) + value
        else:
            per_bound = out.setdefault(key, {})
            per_bound[le] = per_bound.get(le, 0.0) + value
    return out


class Observer:
    """The SLO loop's eyes: one source, one window; an Observation for every target, every time."""

    def __init__(self, source: Source, window_seconds: float):
        format_window(window_seconds)  # a window status cannot show is refused here, not at the first pass
        self.source = source
        self.window_seconds = window_seconds

    def describe(self) -> str:
        return f"SLO observations from {self.source.describe()} over {format_window(self.window_seconds)}"

    async def collect(self, targets: list[Target],
                      pods: Mapping[Key, list[PodEndpoint]]) -> dict[Key, Observation]:
        """An Observation per target, keyed (namespace, name). `pods` lists each deployment's pods: the pod
        scraper reads their /metrics; Prometheus finds them itself and needs none."""
        try:
            seen = await self.source.collect(targets, pods, self.window_seconds)
            failure = None
        except Exception as exc:  # a source's bug must cost one interval's observations, not the loop
            log.exception("observing through %s failed", self.source.describe())
            seen, failure = {}, f"{self.source.describe()}: {type(exc).__name__}: {exc}"
        return {(t.namespace, t.name): seen.get((t.namespace, t.name)) or observation(
                    t, None, source=self.source.name, sampled_at=_sampled_at(), problem=failure,
                    window_seconds=self.window_seconds)
                for t in targets}
