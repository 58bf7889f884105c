"""llama-operator as `llama-operator run --standalone -A` starts it, for bench_operator.py's child process.

Same code path as `llama_operator.cli.cmd_run` (configure_logging, tune_gc, RunOptions, runner.run_async), except
that the metrics and health endpoints listen on 127.0.0.1 (the CLI binds 0.0.0.0), and an optional
cProfile of the main thread.

    python benchmarks/run_operator.py --kubeconfig K [--health-port P] [--metrics-port M] [--cprofile out.prof]
"""
from __future__ import annotations

import argparse
import asyncio
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="llama-operator for the benchmark")
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--health-port", type=int, default=None)
    ap.add_argument("--metrics-port", type=int, default=None)
    ap.add_argument("--cprofile", help="write cProfile stats of the main thread here on exit")
    args = ap.parse_args(argv)

    from llama_operator.state import Settings
    from llama_operator.runner import RunOptions, configure_logging, run_async, tune_gc

    configure_logging()
    tune_gc()
    options = RunOptions(kubeconfig=args.kubeconfig, namespaces=[], metrics_port=args.metrics_port,
                         metrics_host="127.0.0.1", health_port=args.health_port, health_host="127.0.0.1",
                         peering=None, settings=Settings())
    if args.cprofile:
        import cProfile

        prof = cProfile.Profile()
        try:
            prof.runcall(asyncio.run, run_async(options))
        finally:
            prof.dump_stats(args.cprofile)
    else:
        asyncio.run(run_async(options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
