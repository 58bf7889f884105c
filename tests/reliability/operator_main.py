"""The operator in a process of its own, for tests that SIGKILL it and for benchmarks/soak.py's memory
samples: `python tests/reliability/operator_main.py --kubeconfig PATH [...]`.

Prints "OPERATOR READY" once kopf has started; logs go to stderr (the parent redirects them to a file).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import threading
from datetime import timedelta

from llama_operator.state import Settings
from llama_operator.runner import RunOptions, run_async, tune_gc


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--error-backoff", type=float, default=0.5)
    p.add_argument("--max-error-backoff", type=float, default=4.0)
    p.add_argument("--watch-timeout", type=int, default=10)
    p.add_argument("--resync", type=float, default=60.0)
    p.add_argument("--upgrade-delay", type=float, default=60.0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kopf").setLevel(logging.WARNING)
    tune_gc()  # as `llama-operator run` does: the soak's memory trend is the production process's
    settings = Settings(error_backoff_seconds=args.error_backoff, max_error_backoff_seconds=args.max_error_backoff,
                        resync_seconds=args.resync, upgrade_delay=timedelta(seconds=args.upgrade_delay))
    options = RunOptions(kubeconfig=args.kubeconfig, metrics_port=None, health_port=None, settings=settings,
                         watch_timeout=args.watch_timeout)
    ready = threading.Event()

    def announce() -> None:
        if ready.wait(60):
            print("OPERATOR READY", flush=True)
    threading.Thread(target=announce, daemon=True).start()
    asyncio.run(run_async(options, ready_flag=ready))


if __name__ == "__main__":
    main()
