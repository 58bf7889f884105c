"""`llama-operator run`'s options of the SLO loop (docs/slo-loop.md), and what they make of Settings and RunOptions.

Apart from cli.py so that the command-line module stays readable; same layer (the CLI)."""
from __future__ import annotations

import argparse
import os
import re
from datetime import timedelta
from urllib.parse import urlparse

from .loading import UserError
from .slo import SloSettings
from .units import parse_duration


def add_slo_options(r: argparse.ArgumentParser) -> None:
    g = r.add_argument_group("SLO loop (docs/slo-loop.md)")
    g.add_argument("--slo-source", choices=["pods", "prometheus", "off"], default=None,
                   help="where to observe the model servers' latency and load: prometheus (the HTTP API at "
                   "--prometheus-url: one query per signal per interval for every deployment), pods (each ready "
                   "pod's /metrics, directly), off (no loop). Default: prometheus with --prometheus-url, else pods")
    g.add_argument("--prometheus-url", metavar="URL", help="Prometheus server, e.g. http://prometheus.monitoring:9090")
    g.add_argument("--prometheus-token-file", metavar="FILE",
                   help="bearer token for Prometheus, read again every interval (a mounted, rotated token)")
    g.add_argument("--slo-interval", default="30s", metavar="DURATION", help="how often to observe (default 30s)")
    g.add_argument("--slo-window", default="5m", metavar="DURATION",
                   help="the window observations cover, and how long a breach must last before acting (default 5m)")
    g.add_argument("--slo-cooldown", default="5m", metavar="DURATION",
                   help="the least time between two actions on one deployment (default 5m)")
    g.add_argument("--slo-calm-window", default="15m", metavar="DURATION",
                   help="how long the SLO must be met with spare capacity before scaling in (default 15m)")
    g.add_argument("--slo-min-samples", type=int, default=20, metavar="N",
                   help="the fewest requests in a window (output tokens for llama.cpp) to judge the latency on "
                   "(default 20)")
    g.add_argument("--correction-ttl", default="24h", metavar="DURATION",
                   help="how long a measured correction is kept before the planner may try the variant again "
                   "(default 24h)")


def _duration(flag: str, text: str) -> float:
    """A duration as the spec writes one (500ms, 30s, 5m, 1m30s), or whole hours (24h) for the long ones."""
    try:
        hours = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)h", text)
        seconds = float(hours.group(1)) * 3600 if hours else parse_duration(text)
    except ValueError as e:
        raise UserError(f"{flag}: {e}") from None
    if seconds <= 0:
        raise UserError(f"{flag}: must be longer than zero, e.g. 30s")
    return seconds


def slo_run_options(args) -> tuple[SloSettings, float, dict]:
    """The loop's settings, its interval in seconds, and the RunOptions fields of its source."""
    source = args.slo_source or ("prometheus" if args.prometheus_url else "pods")
    if source == "prometheus":
        if not args.prometheus_url:
            raise UserError("--slo-source prometheus needs --prometheus-url, e.g. http://prometheus.monitoring:9090")
        url = urlparse(args.prometheus_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise UserError(f"--prometheus-url: {args.prometheus_url!r} is not an http(s) URL, e.g. "
                            "http://prometheus.monitoring:9090")
    if args.prometheus_token_file and not os.path.isfile(args.prometheus_token_file):
        raise UserError(f"--prometheus-token-file: {args.prometheus_token_file}: no such file")
    interval = _duration("--slo-interval", args.slo_interval)
    window = _duration("--slo-window", args.slo_window)
    if window < 2 * interval:
        raise UserError(f"--slo-window {args.slo_window} must be at least two --slo-interval ({args.slo_interval}): "
                        "a rate needs two samples")
    if args.slo_min_samples < 1:
        raise UserError("--slo-min-samples: must be at least 1, e.g. 20")
    settings = SloSettings(window=timedelta(seconds=window), min_samples=args.slo_min_samples,
                           cooldown=timedelta(seconds=_duration("--slo-cooldown", args.slo_cooldown)),
                           calm_window=timedelta(seconds=_duration("--slo-calm-window", args.slo_calm_window)),
                           correction_ttl=timedelta(seconds=_duration("--correction-ttl", args.correction_ttl)))
    return settings, interval, {"slo_source": source, "prometheus_url": args.prometheus_url,
                                "prometheus_token_file": args.prometheus_token_file}
