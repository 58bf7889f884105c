"""Planner benchmark: `planner.plan(spec, inventory)` on synthetic clusters of 10 to 10,000 nodes.

    .venv/bin/python benchmarks/bench_planner.py [--sizes 10,100,1000,10000] [--repeats 30]

Prints one JSON document on stdout. Not a test: timings depend on the machine and its load, so
compare numbers taken in the same run.

What it times, per cluster size (about 20 node shapes, ~1% of nodes NotReady or cordoned, pods
holding some GPUs; see benchmarks/synthetic.py):

* ``inventory_build``: `Inventory.from_manifests(nodes, pods)`: parsing every manifest (the CLI's
  `plan --cluster`; the operator parses each Node as its watch event arrives, in its node index);
* ``inventory_from_parsed_nodes``: `Inventory(nodes, usage)` from parsed nodes: what the operator pays
  once per cluster change (kept out of the planner numbers below);
* ``groups_on_new_inventory``: grouping the nodes of such a new inventory by shape (once per change);
* ``groups_on_copy``: the groups of a copy (`release` / `reserve_plan`, derived from its origin's):
  what every operator pass pays, since it plans on a copy;
* per spec (70B on the mixed cluster, 90B Vision falling back to 11B, 1B on CPU, 8B chat, an impossible
  405B):
  - ``first_call_ms``: the very first plan in the process for that spec: fresh inventory copy and a
    cold estimate cache;
  - ``fresh_inventory_ms``: plan on a fresh inventory copy (shape groups not yet computed), warm
    estimate cache: the operator's steady state, one sample per repeat;
  - ``steady_ms``: plan again on the same inventory (groups already computed);
* ``reserve_plan_4_replicas``: one `placement.reserve_plan` (what the operator pays per other
  deployment's promise on every pass);
* ``operator_pass``: one operator pass for one deployment among 200 (benchmarks/synthetic.py's
  operator mix, each placed in turn): the inventory less the other deployments' promises (a
  reserve_plan each, as OperatorState.inventory_for does), then the plan.

Goals (issue): median plan under 100 ms at 10,000 nodes, and near-flat cost as nodes grow. "Near
flat" is judged here as: the slowest spec's median fresh-inventory plan at 10,000 nodes is within 2x
of the same at 100 nodes (both sizes have all 20 shapes).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report  # noqa: E402
import synthetic  # noqa: E402

from llama_operator import api, placement, planner  # noqa: E402
from llama_operator.inventory import Inventory, pod_usage  # noqa: E402

GOAL_MS = 100.0
PASS_DEPLOYMENTS = 200
FLAT_RATIO = 2.0


def _ms(ns: int) -> float:
    return ns / 1e6


def _stats(samples_ns: list[int]) -> dict:
    s = sorted(samples_ns)
    p90 = s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]
    return {"median_ms": round(_ms(statistics.median(s)), 3), "p90_ms": round(_ms(p90), 3),
            "min_ms": round(_ms(s[0]), 3), "n": len(s)}


def _timed(fn) -> tuple[int, object]:
    t0 = time.perf_counter_ns()
    out = fn()
    return time.perf_counter_ns() - t0, out


def bench_size(n: int, specs: dict, repeats: int, cold: bool) -> dict:
    nodes, pods = synthetic.cluster(n)
    build_repeats = max(3, min(repeats, 20_000 // max(n, 1)))
    build_ns = []
    inv = None
    for _ in range(build_repeats):
        gc.collect()
        ns, inv = _timed(lambda: Inventory.from_manifests(nodes, pods))
        build_ns.append(ns)
    assert isinstance(inv, Inventory)
    ready = sum(1 for node in inv.nodes.values() if node.ready)

    parsed = list(inv.nodes.values())
    usage = [u for u in (pod_usage(p) for p in pods) if u is not None]
    from_nodes_ns, root_groups_ns = [], []
    for _ in range(build_repeats):
        ns, fresh = _timed(lambda: Inventory(parsed, usage))
        from_nodes_ns.append(ns)
        root_groups_ns.append(_timed(fresh.groups)[0])

    inv.groups()
    groups_ns = []
    for _ in range(repeats):
        copy = inv.release(())
        ns, _ = _timed(copy.groups)
        groups_ns.append(ns)
    shapes = len(inv.groups())

    per_spec = {}
    for name, raw in specs.items():
        spec = api.parse_spec(raw)
        entry: dict = {}
        if cold:
            planner._fixed_verdict.cache_clear()
            copy = inv.release(())
            ns, _ = _timed(lambda: planner.plan(spec, copy))
            entry["first_call_ms"] = round(_ms(ns), 3)
        fresh_ns = []
        result = None
        for _ in range(repeats):
            copy = inv.release(())
            ns, result = _timed(lambda: planner.plan(spec, copy))
            fresh_ns.append(ns)
        steady_inv = inv.release(())
        planner.plan(spec, steady_inv)
        steady_ns = [_timed(lambda: planner.plan(spec, steady_inv))[0] for _ in range(repeats)]
        entry["fresh_inventory"] = _stats(fresh_ns)
        entry["steady"] = _stats(steady_ns)
        entry["candidates"] = len(result.candidates)
        entry["result"] = result.summary()[:160]
        if result.chosen is not None:
            chosen = result.chosen.to_chosen_plan()
            reserve_ns = [_timed(lambda: placement.reserve_plan(inv, spec, chosen, 4))[0] for _ in range(repeats)]
            entry["reserve_plan_4_replicas"] = _stats(reserve_ns)
        per_spec[name] = entry

    # One operator pass (OperatorState.inventory_for, then plan): the inventory less the promises of
    # the other deployments (reserve_plan each), then plan on the result.
    promises = []
    cur = inv
    for _, _, raw in synthetic.operator_specs(PASS_DEPLOYMENTS):
        spec = api.parse_spec(raw)
        p = planner.plan(spec, cur)
        if p.chosen is not None:
            chosen = p.chosen.to_chosen_plan()
            promises.append((spec, chosen))
            cur = placement.reserve_plan(cur, spec, chosen, spec.replicas)
    probe = api.parse_spec(specs[next(iter(specs))])

    def one_pass():
        x = inv
        for spec, chosen in promises[1:]:
            x = placement.reserve_plan(x, spec, chosen, spec.replicas)
        return planner.plan(probe, x)

    one_pass()
    pass_ns = [_timed(one_pass)[0] for _ in range(max(3, repeats // 3))]

    worst = max(e["fresh_inventory"]["median_ms"] for e in per_spec.values())
    return {
        "nodes": n,
        "ready_nodes": ready,
        "pods": len(pods),
        "shapes": shapes,
        "inventory_build": _stats(build_ns),
        "inventory_from_parsed_nodes": _stats(from_nodes_ns),
        "groups_on_new_inventory": _stats(root_groups_ns),
        "groups_on_copy": _stats(groups_ns),
        "specs": per_spec,
        "operator_pass": {"promises": len(promises) - 1, "placed": len(promises),
                          "deployments": PASS_DEPLOYMENTS, **_stats(pass_ns)},
        "worst_spec_median_ms": worst,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--sizes", default="10,100,1000,10000")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--specs", default=None, help="comma-separated subset of: " + ",".join(synthetic.deployment_specs()))
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    specs = synthetic.deployment_specs()
    if args.specs:
        specs = {k: v for k, v in specs.items() if k in args.specs.split(",")}

    started = time.perf_counter()
    results = []
    for n in sizes:
        results.append(bench_size(n, specs, args.repeats, cold=True))
    by_n = {r["nodes"]: r for r in results}

    verdicts: dict = {}
    if 10_000 in by_n:
        worst = by_n[10_000]["worst_spec_median_ms"]
        verdicts["median_under_100ms_at_10000"] = {"pass": worst < GOAL_MS, "worst_spec_median_ms": worst,
                                                   "goal_ms": GOAL_MS}
    base = 100 if 100 in by_n else (min(n for n in by_n if n >= 20) if any(n >= 20 for n in by_n) else None)
    top = max(by_n)
    if base is not None and top > base:
        ratio = by_n[top]["worst_spec_median_ms"] / max(by_n[base]["worst_spec_median_ms"], 1e-9)
        verdicts["near_flat"] = {"pass": ratio <= FLAT_RATIO, "from_nodes": base, "to_nodes": top,
                                 "ratio": round(ratio, 2), "goal_ratio": FLAT_RATIO}
    out = {
        **report.header("planner"),
        "repeats": args.repeats,
        "sizes": results,
        "verdicts": verdicts,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    return report.emit(out)


if __name__ == "__main__":
    sys.exit(main())
