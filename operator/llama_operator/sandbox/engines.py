"""Simulated model servers, so the SLO loop has something real to observe in the sandbox.

The API emulator runs no containers. For each pod the SimulatedKubelet "runs", `SimulatedEngines` serves
`GET /metrics` and `GET /health` on the pod's own loopback address (127.0.x.y; Linux routes all of
127.0.0.0/8 to the loopback interface) and its runtime's port, as the real engine would on the pod's IP.
The operator scrapes them exactly as it scrapes real pods: the series names are those of the pod's
engine release in the catalog (engines.yaml `metrics.names` and `sloSignals`), printed in that engine's
own format: vLLM's prometheus_client histograms, counters and gauges; llama.cpp's label-less counters and
gauges as its server prints them.

What the engine reports follows from the owning LlamaDeployment (`traffic`): latency is the plan's
estimate times the annotation `sandbox.llama-operator.dev/latency-factor` (a person's way to make the
hardware slower than predicted), load is spec.slo.concurrency x spec.replicas x the annotation
`sandbox.llama-operator.dev/load-factor`, spread over the deployment's serving pods. Counters integrate the
request rate over time, so two scrapes a window apart give rates as from a real server.

A pod started with a draft model (its rendered arguments: vLLM `--speculative-config`, llama.cpp `--spec-type
draft-simple`; docs/speculative.md) also counts drafted and accepted tokens, under the release's names
(engines.yaml `speculative.metrics`): vLLM creates them only with a draft, llama.cpp always exports them (zero
without one). Accepted over drafted tokens is what the plan predicts, acceptance_rate(status.plan.speculative.
acceptance, the pod's draft length) (drafting.py), unless the annotation
`sandbox.llama-operator.dev/draft-acceptance` gives the rate (0 to 1: traffic the draft guesses worse or better
than published). Drafted tokens per second are the output tokens per second over the tokens one verifying pass
yields, tokens_per_pass(alpha, k), times k: the mean of the real process, which is good enough for a rate the
loop reads over a window. The annotation changes these counters only, not the latency (still the plan's
estimate): the SLO loop turns a draft off on the acceptance it counts (slo.py), whatever the latency shows.

Annotations (the sandbox's only; a real cluster ignores them; examples/slo-loop.yaml, examples/speculative.yaml):
  sandbox.llama-operator.dev/latency-factor    the engine runs this many times slower than the plan's estimate
  sandbox.llama-operator.dev/load-factor       offered load = slo.concurrency x replicas x this factor
  sandbox.llama-operator.dev/draft-acceptance  accepted over drafted tokens (default: the plan's prediction)

The servers are the standard library's: a ThreadingHTTPServer per pod, in daemon threads.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import islice

from ..drafting import acceptance_rate, alpha_for_rate, tokens_per_pass
from ..engines import EngineRelease
from ..metrics import VLLM_TPOT_BUCKETS, VLLM_TTFT_BUCKETS, format_le

log = logging.getLogger(__name__)

#: Output tokens of every simulated request: a request takes ttft + tpot x OUTPUT_TOKENS seconds.
OUTPUT_TOKENS = 128
LATENCY_FACTOR = "sandbox.llama-operator.dev/latency-factor"
LOAD_FACTOR = "sandbox.llama-operator.dev/load-factor"
DRAFT_ACCEPTANCE = "sandbox.llama-operator.dev/draft-acceptance"
CONTENT_TYPE = "text/plain; version=0.0.4"
#: The uniform latency distribution spans [LOW x q, HIGH x q]: its 95th percentile is q exactly.
LOW, HIGH = 0.5, 0.5 + 0.5 / 0.95


# --- what an engine serves ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """What one pod's engine is doing: its latency (None: its deployment has no plan, nothing is served)
    and its requests running and waiting."""

    ttft: float | None = None
    tpot: float | None = None
    running: float = 0.0
    waiting: float = 0.0
    prompt_tokens: int = 512
    concurrency: int = 1
    #: The draft's per-token acceptance the plan assumes (status.plan.speculative.acceptance); None: no draft.
    draft_alpha: float | None = None
    #: Accepted over drafted tokens to report instead of the plan's (the draft-acceptance annotation).
    draft_rate: float | None = None

    @property
    def requests_per_second(self) -> float:
        """Each running request takes ttft + tpot x OUTPUT_TOKENS; as many finish per second as run."""
        if self.ttft is None or self.tpot is None or self.running <= 0:
            return 0.0
        return self.running / (self.ttft + self.tpot * OUTPUT_TOKENS)


def _factor(annotations: dict, key: str) -> float:
    """A sandbox annotation's factor: a positive finite number, else 1."""
    try:
        value = float(annotations.get(key, 1))
    except (TypeError, ValueError):
        return 1.0
    return value if math.isfinite(value) and value > 0 else 1.0


def _rate(annotations: dict, key: str) -> float | None:
    """A sandbox annotation's rate: a number from 0 to 1, else None (ignored)."""
    try:
        value = float(annotations[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if 0.0 <= value <= 1.0 else None


def traffic(ld: dict | None, serving_pods: int) -> Traffic:
    """What each of the `serving_pods` pods of LlamaDeployment `ld` (a dict as the API returns it) serves.

    The latency is the estimate the plan was made with, without the correction the operator learned
    (status.plan.predicted.correctedBy): the simulated hardware stays as slow as it is, whatever the
    operator has learned about it; the latency-factor annotation is how slow that is."""
    spec = (ld or {}).get("spec") or {}
    slo = spec.get("slo") or {}
    prompt_tokens, concurrency = int(slo.get("promptTokens", 512)), int(slo.get("concurrency", 1))
    plan = ((ld or {}).get("status") or {}).get("plan") or {}
    predicted = plan.get("predicted") or {}
    if not predicted or serving_pods <= 0:
        return Traffic(prompt_tokens=prompt_tokens, concurrency=concurrency)
    annotations = ld["metadata"].get("annotations") or {}
    slower = _factor(annotations, LATENCY_FACTOR)
    corrected = predicted.get("correctedBy") or {}
    ttft = float(predicted["ttftSeconds"]) / float(corrected.get("ttftFactor") or 1) * slower
    tpot = float(predicted["tpotSeconds"]) / float(corrected.get("tpotFactor") or 1) * slower
    offered = concurrency * int(spec.get("replicas", 1)) * _factor(annotations, LOAD_FACTOR) / serving_pods
    running = min(offered, concurrency)
    alpha = (plan.get("speculative") or {}).get("acceptance")
    return Traffic(ttft=ttft, tpot=tpot, running=running, waiting=offered - running, prompt_tokens=prompt_tokens,
                   concurrency=concurrency, draft_alpha=float(alpha) if alpha is not None else None,
                   draft_rate=_rate(annotations, DRAFT_ACCEPTANCE))


# --- the counters of one engine ----------------------------------------------------------------------------


@dataclass
class _Histogram:
    """One latency histogram: fractional accumulators per bucket bound, printed as their floor (monotone)."""

    bounds: tuple[float, ...]
    latency: str  # ttft | tpot
    per_request: int  # observations per request: 1, or one per gap between output tokens
    cumulative: list[float] = field(init=False)
    count: float = 0.0
    sum: float = 0.0

    def __post_init__(self) -> None:
        self.cumulative = [0.0] * len(self.bounds)

    def observe(self, requests: float, q: float) -> None:
        """`requests` requests' observations, uniform on [LOW q, HIGH q] (so the p95 is q). The sum grows
        by the mean per whole observation counted, so sum over count is the mean in any window."""
        n = requests * self.per_request
        lo, hi = LOW * q, HIGH * q
        for i, le in enumerate(self.bounds):
            self.cumulative[i] += n * min(1.0, max(0.0, (le - lo) / (hi - lo)))
        whole = math.floor(self.count + n) - math.floor(self.count)
        self.count += n
        self.sum += whole * (lo + hi) / 2


#: vLLM's series, in the order its PrometheusStatLogger registers them (vllm/v1/metrics/loggers.py of the
#: pinned releases): the draft's counters, gauges and the counter with their HELP text; then the histograms,
#: with their HELP text, bucket bounds, which latency they observe, and how many observations a request makes.
_VLLM_HELP = {
    # vllm/v1/spec_decode/metrics.py (SpecDecodingProm, created before the gauges, loggers.py:508): only with a draft
    "vllm:spec_decode_num_draft_tokens_total": "Number of draft tokens.",
    "vllm:spec_decode_num_accepted_tokens_total": "Number of accepted tokens.",
    "vllm:num_requests_running": "Number of requests in model execution batches.",
    "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
    "vllm:gpu_cache_usage_perc": "GPU KV-cache usage. 1 means 100 percent usage.DEPRECATED: Use "
                                 "vllm:kv_cache_usage_perc instead.",
    "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
    "vllm:generation_tokens_total": "Number of generation tokens processed.",
}
_VLLM_HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": ("Histogram of time to first token in seconds.", VLLM_TTFT_BUCKETS,
                                         "ttft", 1),
    "vllm:time_per_output_token_seconds": ("Histogram of time per output token in seconds.DEPRECATED: Use "
                                           "vllm:inter_token_latency_seconds instead.", VLLM_TPOT_BUCKETS, "tpot",
                                           OUTPUT_TOKENS - 1),
    "vllm:inter_token_latency_seconds": ("Histogram of inter-token latency in seconds.", VLLM_TPOT_BUCKETS, "tpot",
                                         OUTPUT_TOKENS - 1),
    "vllm:request_time_per_output_token_seconds": ("Histogram of time_per_output_token_seconds per request.",
                                                   VLLM_TPOT_BUCKETS, "tpot", 1),
}


class SimulatedEngine:
    """One pod's engine: its counters, integrated over time at the request rate of its current `Traffic`,
    and its /metrics text in the format of its release. `draft_tokens`: the draft length it was started with
    (kubelet.draft_length), None without a draft."""

    def __init__(self, release: EngineRelease, model_name: str, draft_tokens: int | None = None):
        self.release = release
        self.model_name = model_name
        self.draft_tokens = draft_tokens
        #: (per-token acceptance, accepted over drafted tokens) the draft runs at; kept when a new plan without a
        #: draft takes over (this pod still drafts until it is retired).
        self._draft: tuple[float, float] | None = None
        self._drafted = self._accepted = self._drafts = 0.0
        self._lock = threading.Lock()
        self._traffic = Traffic()
        self._at = time.monotonic()
        self._prompt_tokens = self._prompt_seconds = 0.0
        self._output_tokens = self._output_seconds = self._decodes = self._busy_slots = 0.0
        self._largest_batch = 0
        self._histograms = {name: _Histogram(bounds, latency, per_request)
                            for name, (_, bounds, latency, per_request) in _VLLM_HISTOGRAMS.items()
                            if name in release.metrics}
        self._last_scrape = (0.0, 0.0, 0.0, 0.0)  # llama.cpp's throughput gauges cover the time since

    def set_traffic(self, new: Traffic) -> None:
        with self._lock:
            self._advance()
            self._traffic = new
            k = self.draft_tokens
            if k and new.draft_rate is not None:
                self._draft = (alpha_for_rate(new.draft_rate, k), new.draft_rate)
            elif k and new.draft_alpha is not None:
                self._draft = (new.draft_alpha, acceptance_rate(new.draft_alpha, k))

    def _advance(self) -> None:
        """Count what finished since the last call, at the rate of the traffic in force since then."""
        now = time.monotonic()
        dt, self._at = now - self._at, now
        t = self._traffic
        done = t.requests_per_second * max(dt, 0.0)
        if done <= 0:
            return
        assert t.ttft is not None and t.tpot is not None
        self._prompt_tokens += done * t.prompt_tokens
        self._prompt_seconds += done * t.ttft
        self._output_tokens += done * OUTPUT_TOKENS
        self._output_seconds += done * OUTPUT_TOKENS * t.tpot
        # llama.cpp: one llama_decode() per prompt, and one per step of the running slots' generation
        decodes = done + done * OUTPUT_TOKENS / t.running
        self._decodes += decodes
        self._busy_slots += decodes * t.running
        self._largest_batch = max(self._largest_batch, t.prompt_tokens)
        if self.draft_tokens and self._draft is not None:
            alpha, rate = self._draft
            passes = done * OUTPUT_TOKENS / tokens_per_pass(alpha, self.draft_tokens)
            self._drafts += passes
            self._drafted += passes * self.draft_tokens
            self._accepted += passes * self.draft_tokens * rate
        for h in self._histograms.values():
            h.observe(done, t.ttft if h.latency == "ttft" else t.tpot)

    def metrics(self) -> str:
        with self._lock:
            self._advance()
            return self._vllm() if self.release.engine == "vllm" else self._llamacpp()

    def _vllm(self) -> str:
        """As prometheus_client prints vLLM's registry (labels sorted, values as Go floats), without the
        `_created` samples; the release's series of the catalog only."""
        t = self._traffic
        labels = f'engine="0",model_name="{self.model_name}"'
        gauges = {"vllm:num_requests_running": t.running, "vllm:num_requests_waiting": t.waiting,
                  "vllm:kv_cache_usage_perc": t.running / t.concurrency,
                  "vllm:gpu_cache_usage_perc": t.running / t.concurrency}
        signals = self.release.slo_signals
        drafting = {signals.draft_tokens: self._drafted, signals.draft_accepted: self._accepted}
        lines = []
        for name in [n for n in (*_VLLM_HELP, *_VLLM_HISTOGRAMS) if n in self.release.metrics]:
            if name in self._histograms:
                h = self._histograms[name]
                lines += [f"# HELP {name} {_VLLM_HISTOGRAMS[name][0]}", f"# TYPE {name} histogram"]
                for le, n in zip(h.bounds, h.cumulative):
                    lines.append(f'{name}_bucket{{engine="0",le="{format_le(le)}",model_name="{self.model_name}"}} '
                                 f"{format_le(math.floor(n))}")
                lines.append(f'{name}_bucket{{engine="0",le="+Inf",model_name="{self.model_name}"}} '
                             f"{format_le(math.floor(h.count))}")
                lines.append(f"{name}_count{{{labels}}} {format_le(math.floor(h.count))}")
                lines.append(f"{name}_sum{{{labels}}} {format_le(h.sum)}")
            elif name == "vllm:generation_tokens_total":
                lines += [f"# HELP {name} {_VLLM_HELP[name]}", f"# TYPE {name} counter",
                          f"{name}{{{labels}}} {format_le(math.floor(self._output_tokens))}"]
            elif name in drafting:
                if self.draft_tokens:  # vLLM creates them only with a speculative config
                    lines += [f"# HELP {name} {_VLLM_HELP[name]}", f"# TYPE {name} counter",
                              f"{name}{{{labels}}} {format_le(math.floor(drafting[name]))}"]
            elif name in gauges:
                lines += [f"# HELP {name} {_VLLM_HELP[name]}", f"# TYPE {name} gauge",
                          f"{name}{{{labels}}} {format_le(gauges[name])}"]
        return "\n".join(lines) + "\n"

    def _llamacpp(self) -> str:
        """As llama-server prints its metrics (tools/server, the `all_metrics_def` loop): per item `# HELP
        llamacpp:<name> <text>`, `# TYPE llamacpp:<name> <type>`, the value as a C++ stream prints a
        double (six significant digits), no labels; seconds from whole milliseconds."""
        t = self._traffic
        tokens, seconds = math.floor(self._prompt_tokens), math.floor(self._prompt_seconds * 1e3) / 1e3
        out_tokens, out_seconds = math.floor(self._output_tokens), math.floor(self._output_seconds * 1e3) / 1e3
        last_tokens, last_seconds, last_out_tokens, last_out_seconds = self._last_scrape
        self._last_scrape = (tokens, seconds, out_tokens, out_seconds)
        items = [
            ("counter", "prompt_tokens_total", "Number of prompt tokens processed.", tokens),
            ("counter", "prompt_seconds_total", "Prompt process time", seconds),
            ("counter", "tokens_predicted_total", "Number of generation tokens processed.", out_tokens),
            ("counter", "tokens_predicted_seconds_total", "Predict process time", out_seconds),
            ("counter", "n_decode_total", "Total number of llama_decode() calls", math.floor(self._decodes)),
            ("counter", "n_tokens_max", "Largest observed n_tokens.", self._largest_batch),
            # always exported, zero without a draft (b11434 tools/server/server-task.cpp:1564-1575)
            ("counter", "spec_decode_num_draft_tokens_total", "Speculative: Total draft tokens generated",
             math.floor(self._drafted)),
            ("counter", "spec_decode_num_accepted_tokens_total",
             "Speculative: Total draft tokens accepted by the target model", math.floor(self._accepted)),
            ("counter", "spec_decode_num_drafts_total", "Speculative: Total speculative decoding verification steps",
             math.floor(self._drafts)),
            ("counter", "n_busy_slots_per_decode", "Average number of busy slots per llama_decode() call",
             self._busy_slots / max(self._decodes, 1.0)),
            ("gauge", "prompt_tokens_seconds", "Average prompt throughput in tokens/s.",
             _per_second(tokens - last_tokens, seconds - last_seconds)),
            ("gauge", "predicted_tokens_seconds", "Average generation throughput in tokens/s.",
             _per_second(out_tokens - last_out_tokens, out_seconds - last_out_seconds)),
            ("gauge", "requests_processing", "Number of requests processing.", t.running),
            ("gauge", "requests_deferred", "Number of requests deferred.", t.waiting),
        ]
        return "".join(f"# HELP llamacpp:{name} {text}\n# TYPE llamacpp:{name} {kind}\nllamacpp:{name} {value:g}\n"
                       for kind, name, text, value in items)


def _per_second(tokens: float, seconds: float) -> float:
    """llama-server's throughput gauges: tokens over the time spent on them since the previous scrape."""
    return tokens / seconds if tokens and seconds > 0 else 0.0


# --- serving them ------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: "_EngineServer"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._answer(200, self.server.engine.metrics(), CONTENT_TYPE)
        elif path == "/health":
            self._answer(200, "{\"status\":\"ok\"}" if self.server.engine.release.engine == "llamacpp" else "",
                         "application/json")
        else:
            self._answer(404, "Not Found\n", "text/plain")

    def _answer(self, status: int, body: str, content_type: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        """Scrapes every few seconds would drown the sandbox's own story; nothing is logged."""


class _EngineServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: SimulatedEngine):
        self.engine = engine
        super().__init__(address, _Handler)


class AddressPool:
    """Loopback addresses for pods: 127.0.1.1 upward (never 127.0.0.1, the host's own), the lowest free
    one first, freed ones reused."""

    def __init__(self) -> None:
        self._taken: set[int] = set()

    @staticmethod
    def _spell(n: int) -> str:
        return f"127.0.{n // 254 + 1}.{n % 254 + 1}"

    @staticmethod
    def index(address: str) -> int | None:
        """The pool's number of an address it hands out (None: not one of them)."""
        parts = address.split(".")
        if len(parts) != 4 or parts[:2] != ["127", "0"] or not all(p.isdigit() for p in parts[2:]):
            return None
        x, y = int(parts[2]), int(parts[3])
        return (x - 1) * 254 + (y - 1) if 1 <= x <= 255 and 1 <= y <= 254 else None

    def candidates(self):
        """Free addresses, lowest first."""
        return (self._spell(n) for n in range(255 * 254) if n not in self._taken)

    def take(self, address: str) -> None:
        n = self.index(address)
        if n is not None:
            self._taken.add(n)

    def free(self, address: str) -> None:
        n = self.index(address)
        if n is not None:
            self._taken.discard(n)


#: How many addresses one pod tries in one step when others (another process's servers) hold them.
_TRIES = 32
#: Seconds a server takes to notice it is shut down (the kubelet stops them one after another).
_POLL = 0.05


class SimulatedEngines:
    """The simulated model servers of the pods a SimulatedKubelet runs, keyed by (namespace, pod name).

    `serve` starts one (or finds it running) and answers its address; `update` sets what it serves;
    `retire` stops those of pods that are gone; `stop` stops all. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: dict[tuple[str, str], tuple[str, _EngineServer]] = {}
        self._pool = AddressPool()
        self._warned: set[tuple[str, str]] = set()
        self._stopped = False

    def serve(self, key: tuple[str, str], release: EngineRelease, model_name: str, port: int,
              address: str | None = None, draft_tokens: int | None = None) -> str | None:
        """Serve pod `key`'s engine on `address` (a pod that already has one), else on the lowest free
        loopback address; its address, or None when no address could be bound this time (logged; the
        kubelet tries again at its next step). `draft_tokens`: the pod drafts that many tokens per step."""
        with self._lock:
            if key in self._servers:
                return self._servers[key][0]
            if self._stopped:
                return None
            engine = SimulatedEngine(release, model_name, draft_tokens)
            tries = [address] if address else list(islice(self._pool.candidates(), _TRIES))
            problem: OSError | None = None
            for candidate in tries:
                try:
                    server = _EngineServer((candidate, port), engine)
                except OSError as e:
                    problem = e
                    continue
                self._pool.take(candidate)
                threading.Thread(target=server.serve_forever, kwargs={"poll_interval": _POLL}, name=f"engine-{key[1]}",
                                 daemon=True).start()
                self._servers[key] = (candidate, server)
                self._warned.discard(key)
                return candidate
            if key not in self._warned:
                self._warned.add(key)
                log.warning("simulated engine of pod %s/%s: cannot listen on %s port %d: %s; trying again",
                            *key, address or "a loopback address", port, problem)
            return None

    def update(self, key: tuple[str, str], new: Traffic) -> None:
        with self._lock:
            entry = self._servers.get(key)
        if entry is not None:
            entry[1].engine.set_traffic(new)

    def retire(self, keep: set[tuple[str, str]]) -> None:
        """Stop the servers of pods not in `keep`."""
        with self._lock:
            gone = [(key, self._servers.pop(key)) for key in list(self._servers) if key not in keep]
            self._warned &= keep
            for _, (address, _server) in gone:
                self._pool.free(address)
        for _, (_, server) in gone:
            server.shutdown()
            server.server_close()

    def stop(self) -> None:
        """Stop every server; none starts after."""
        with self._lock:
            self._stopped = True
        self.retire(set())
