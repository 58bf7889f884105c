"""llama-operator as `llama-operator run --standalone -A` starts it, for bench_operator.py's child process.

Same code path as `llama_operator.cli.cmd_run` (kopf.configure, RunOptions, runner.run_async), except
that the metrics and health endpoints listen on 127.0.0.1 (the CLI binds 0.0.0.0), and an optional
cProfile of the main thread.

    python benchmarks/run_operator.py --kubeconfig K [--health-port P] [--metrics-port M] [--cprofile out.prof]
        [--experiment render-cloader] [--experiment targeted-wakeups]

--experiment monkeypatches this process only, to measure a change proposed for a file the benchmark
does not own before anyone makes it (docs/benchmarks.md, "Proposals"); without it, the operator runs
exactly as shipped:

* render-cloader: render parses its YAML with libyaml's CSafeLoader instead of pure-Python SafeLoader
  (same objects; ~6x faster render);
* targeted-wakeups: a new promise (a deployment's first plan) wakes only the deployments holding
  promises on the same GPU product / CPU shape (the only ones whose plan it can break), those without a
  promise and those with a pending change, and does not drop the cached inventory (promises are applied
  on top of it in inventory_for); a changed or dropped promise still wakes everyone.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys


def _render_cloader() -> None:
    import types

    import yaml

    import llama_operator.render as render

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    render.yaml = types.SimpleNamespace(**{**vars(yaml), "safe_load_all": lambda s: yaml.load_all(s, Loader=loader)})


def _targeted_wakeups() -> None:
    from llama_operator import handlers

    def pool(plan) -> tuple:
        return ("gpu", plan.gpuProduct) if plan.gpuProduct else ("cpu", plan.cpuMemoryBandwidthGbps)

    def _promise(state, key, spec, decision) -> None:
        if decision.apply is None:
            return
        promise = handlers._Promise(spec=spec, plan=decision.apply)
        old = state.promises.get(key)
        if old == promise:
            return
        state.promises[key] = promise
        if old is not None:  # capacity moves or returns: anyone may now do better
            state.invalidate()
            return
        # Capacity taken on one pool can only break plans on that pool.
        taken = pool(promise.plan)
        for other, event in list(state.signals.items()):
            if other == key:
                continue
            held = state.promises.get(other)
            pending = (state.written_status.get(other) or {}).get("pendingChange")
            if held is None or pending or pool(held.plan) == taken:
                event.set()

    handlers._promise = _promise


def _quiet_self_events() -> None:
    import kopf

    from llama_operator import handlers, runner

    def llamadeployment_event(type: str, body, memo, **_):
        state = memo["state"]
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if type == "DELETED":
            state.bodies.pop(key, None)
            state.written_status.pop(key, None)
            if state.promises.pop(key, None) is not None:
                state.invalidate()
            state.metrics.forget_deployment(*key)
            return
        old = state.bodies.get(key)
        state.bodies[key] = dict(body)
        meta, old_meta = body["metadata"], (old or {}).get("metadata") or {}
        # Our own status patch and kopf's finalizer patch change neither spec nor generation: no pass.
        if old is None or old.get("spec") != body.get("spec") or old_meta.get("generation") != meta.get("generation") \
                or old_meta.get("deletionTimestamp") != meta.get("deletionTimestamp"):
            state.signal(key).set()

    def deployment_event(type: str, body, memo, **_):
        owner = (body["metadata"].get("labels") or {}).get(handlers.LABEL_DEPLOYMENT)
        if not owner:
            return
        state = memo["state"]
        seen = state.__dict__.setdefault("_seen_deployments", {})
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        now = (dict(body.get("status") or {}), (body["metadata"].get("annotations") or {}).get(
            "llama-operator.dev/spec-hash"))
        before = seen.get(key)
        seen[key] = now
        # Our own create (no status yet) needs no pass; a status or someone else's change does.
        if type == "DELETED" or (before is None and now[0]) or (before is not None and before != now):
            state.signal((body["metadata"]["namespace"], owner)).set()

    replacements = {"llamadeployment_event": llamadeployment_event, "deployment_event": deployment_event}
    original_register, original_event = runner.register, kopf.on.event

    def event(*args, id=None, **kwargs):
        decorator = original_event(*args, id=id, **kwargs)
        if id in replacements:
            return lambda fn: decorator(replacements[id])
        return decorator

    def register(registry) -> None:
        kopf.on.event = event
        try:
            original_register(registry)
        finally:
            kopf.on.event = original_event

    runner.register = register


EXPERIMENTS = {"render-cloader": _render_cloader, "targeted-wakeups": _targeted_wakeups,
               "quiet-self-events": _quiet_self_events}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="llama-operator for the benchmark")
    ap.add_argument("--kubeconfig", required=True)
    ap.add_argument("--health-port", type=int, default=None)
    ap.add_argument("--metrics-port", type=int, default=None)
    ap.add_argument("--cprofile", help="write cProfile stats of the main thread here on exit")
    ap.add_argument("--experiment", action="append", default=[], choices=sorted(EXPERIMENTS))
    args = ap.parse_args(argv)
    for name in args.experiment:
        EXPERIMENTS[name]()

    import kopf

    from llama_operator.handlers import Settings
    from llama_operator.runner import RunOptions, run_async

    kopf.configure(verbose=False, log_format=kopf.LogFormat.FULL)
    logging.getLogger("llama_operator").setLevel(logging.INFO)
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
