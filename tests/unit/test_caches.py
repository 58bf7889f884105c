"""Module-level caches keep nothing of a LlamaDeployment for long, whatever its spec carries.

The operator renders every deployment on every pass and caches the render per spec and plan
(render._rendered); the API parses durations and quantities through small caches. A spec's strings are
bounded (fields.py), and the render cache is bounded by entries and by the bytes it holds, keyed by a
digest: many distinct large specs (deployments created and deleted) leave at most its budget behind.
"""
from __future__ import annotations

import gc
import tracemalloc

import pytest

from llama_operator import api, fields, planner, units
from llama_operator import render as R
from llama_operator.api import parse_spec

BASE = {"model": "llama-3.1-8b-instruct", "slo": {"ttftP95": "10s", "tpotP95": "1s"}, "memoryBudget": "200Gi"}
OWNER = R.Owner(name="chat", namespace="default", uid="0000")


def largest_spec(i: int) -> dict:
    """A spec as large as the API admits (about 30 KB of strings), distinct for each i."""
    prefix = "p" * 239 + f"{i:012d}.x"  # a 253-character label key prefix
    return {**BASE, "placement": {
        "tolerations": [{"key": f"{prefix}/{'k' * 60}{j:03d}", "operator": "Equal", "value": "v" * 60 + f"{j:03d}",
                         "effect": "NoSchedule"} for j in range(fields.MAX_TOLERATIONS)],
        "nodeSelector": {f"{prefix}/{'k' * 60}{j:03d}": "v" * 60 + f"{j:03d}"
                         for j in range(fields.MAX_NODE_SELECTOR_ENTRIES)},
        "gpuProducts": ["L4"] + ["g" * 60 + f"{j:03d}" for j in range(fields.MAX_GPU_PRODUCTS - 1)]}}


@pytest.fixture
def plan(make_node, make_inventory):
    chosen = planner.plan(parse_spec(BASE), make_inventory(make_node("l4", "NVIDIA-L4", 4))).chosen
    assert chosen is not None
    return chosen.to_chosen_plan()


def retained_after(fn) -> int:
    """Bytes still allocated (traced) after fn() and a full collection."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fn()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_many_distinct_large_specs_leave_at_most_the_render_cache_budget(plan):
    R._rendered.clear()
    specs = [parse_spec(largest_spec(i)) for i in range(300)]  # parsed first: only the renders are measured

    def render_all():
        for spec in specs:
            R.render(OWNER, spec, plan)

    retained = retained_after(render_all)
    assert R._rendered.bytes <= R._RENDERED_BYTES and len(R._rendered) < 300  # the byte budget evicted some
    # What the entries hold (parsed objects, values) takes more than the bytes counted, but stays near it:
    # measured 13 MiB for the 8 MiB budget (before the budget and digest keys: 23 MiB for these 300, and
    # 384 MiB for 200 specs of 1 MB strings, which the API now refuses).
    assert retained < 2 * R._RENDERED_BYTES, f"{retained / 2**20:.1f} MiB retained"


def test_deleted_deployments_renders_are_released(plan):
    R._rendered.clear()
    large = [parse_spec(largest_spec(i)) for i in range(100)]
    small = [parse_spec({**BASE, "replicas": 1 + i % 50, "contextLength": 1024 + i}) for i in range(R._RENDERED_LIMIT)]

    def churn():
        for spec in large:  # created, rendered, then deleted...
            R.render(OWNER, spec, plan)
        for spec in small:  # ...while others keep being rendered
            R.render(OWNER, spec, plan)

    retained = retained_after(churn)
    assert len(R._rendered) == R._RENDERED_LIMIT
    assert R._rendered.bytes < R._RENDERED_BYTES / 2
    assert retained < R._RENDERED_BYTES, f"{retained / 2**20:.1f} MiB retained"


def test_the_render_cache_keys_hold_no_spec_text(plan):
    R._rendered.clear()
    spec = parse_spec(largest_spec(0))
    R.render(OWNER, spec, plan)
    (key,) = list(R._rendered._entries)
    assert len(repr(key)) < 200
    assert R.render(OWNER, spec, plan) == R.render(OWNER, spec, plan)  # and a hit renders the same objects


def test_the_bounded_cache_evicts_the_least_recently_used_by_entries_and_bytes():
    cache = R._BoundedCache(max_entries=3, max_bytes=100)
    for k in "abc":
        cache.put(k, k.upper(), 10)
    assert cache.get("a") == "A"  # a is now the most recent
    cache.put("d", "D", 10)
    assert cache.get("b") is None and [cache.get(k) for k in "acd"] == ["A", "C", "D"]
    cache.put("e", "E", 85)  # over the byte budget: the oldest go until it fits
    assert len(cache) == 2 and cache.bytes == 95 and cache.get("d") == "D" and cache.get("e") == "E"
    cache.put("huge", "H", 101)  # larger than the whole budget: not kept, nothing evicted for it
    assert cache.get("huge") is None and len(cache) == 2
    cache.put("e", "E2", 5)  # replacing an entry counts its new size
    assert cache.bytes == 15 and cache.get("e") == "E2"


def test_the_parse_caches_hold_only_short_strings(spec_dict):
    units._parse_duration.cache_clear()
    units._parse_quantity.cache_clear()
    for i in range(50):
        with pytest.raises(api.SpecError):
            parse_spec(spec_dict(memoryBudget=f"{i}" * 40_000, slo={"ttftP95": "1" * 40_000 + "s"}))
        parse_spec(spec_dict(memoryBudget=f"{i + 1}Gi", slo={"ttftP95": f"{i + 1}s"}))
    assert units._parse_quantity.cache_info().currsize <= 50
    assert units._parse_duration.cache_info().currsize <= 51
