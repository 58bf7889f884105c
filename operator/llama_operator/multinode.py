"""A replica spanning nodes: the planner's candidate for a vLLM variant that no one node of a GPU pool can hold.

When every tensor-parallel size a node of the pool allows fails on GPU memory, the planner asks `across_nodes`
for the candidate of n = 2, 3, ... nodes of that pool (tensor parallel over the node's GPUs, pipeline parallel
across the nodes; pipeline.py estimates it), the fewest whose GPUs hold it. It is offered only when:

* the runtime is vLLM, on a release whose multi-node launch the operator knows (MULTINODE_RELEASES);
  llama.cpp never spans nodes (its rpc-server is a proof of concept without authentication upstream);
* the cluster has LeaderWorkerSet (a replica is one LeaderWorkerSet group); without it the candidate is
  rejected with a reason saying how to install it.

Within a rung one node is always cheaper than several (Candidate.cost_key); across rungs the ladder's order
decides (docs/fallback.md). The planner imports this module, never the reverse: checking a candidate is the
planner's, handed in as `check`.
"""
from __future__ import annotations

from typing import Callable

from .candidate import Candidate
from .engines import release_for

#: The most nodes one replica may span (pipeline stages): past this, a smaller variant is the better answer.
MAX_NODES_PER_REPLICA = 8
#: Engine releases whose multi-node launch (--nnodes, --node-rank, --master-addr, --headless on the workers;
#: multiprocessing backend, no Ray) the operator has checked and renders (docs/multinode.md).
MULTINODE_RELEASES = frozenset({"vllm-0.34.0"})
#: How an added reason of a candidate that would need several nodes but cannot have them starts (the
#: planner's memory-only test knows it: such a candidate failed on memory all the same).
NO_SPAN_PREFIX = "one node cannot hold it, and "
LLAMACPP_NO_SPAN = (NO_SPAN_PREFIX + "llama.cpp does not span nodes: its rpc-server is a proof of concept "
                    "without authentication upstream")
LWS_HINT = ("install it (https://lws.sigs.k8s.io: kubectl apply --server-side -f the release's manifests.yaml) "
            "to span nodes")


def lws_missing(c: Candidate) -> str:
    """The reason a candidate spanning nodes is rejected on a cluster without LeaderWorkerSet."""
    product = c.pool.gpu.product if c.pool.gpu else "?"
    return (f"LeaderWorkerSet (leaderworkerset.x-k8s.io) is not installed: one replica needs "
            f"{c.nodes_per_replica} nodes of {c.gpus_per_replica}x {product}; {LWS_HINT}")


def span_problem(c: Candidate, leaderworkerset: bool) -> str | None:
    """Why a candidate spanning nodes cannot be served on this cluster; None when it can (or is on one node)."""
    if c.nodes_per_replica <= 1:
        return None
    if c.runtime != "vllm":
        return LLAMACPP_NO_SPAN
    rel = release_for(c.model, "vllm")
    if rel is None or rel.id not in MULTINODE_RELEASES:
        return f"{NO_SPAN_PREFIX}{rel.id if rel else 'its vLLM release'} is not offered across nodes: {_unchecked()}"
    if not leaderworkerset:
        return lws_missing(c)
    return None


def _unchecked() -> str:
    return f"its multi-node launch is not checked (only {', '.join(sorted(MULTINODE_RELEASES))}'s is)"


def out_of_one_node(c: Candidate) -> bool:
    """Whether the candidate failed on its GPUs' memory (the planner's "... per GPU > ... usable" reason)."""
    return c.estimate is not None and any(" per GPU > " in r for r in c.reasons)


def across_nodes(best: Candidate, largest: Candidate, leaderworkerset: bool,
                 check: Callable[[Candidate], None]) -> Candidate:
    """The line of a (variant, pool) whose one-node attempts all failed: `best` (the attempt closest to
    working) unless `largest` (the most GPUs a node allows) failed on GPU memory, in which case a replica
    spanning nodes is considered. `check` is the planner's (estimate and verdict, into the candidate).

    vLLM on a release that spans nodes: the candidate of the fewest nodes whose GPUs hold it, checked, and
    rejected without LeaderWorkerSet; `best` when even MAX_NODES_PER_REPLICA nodes do not hold it, or when
    the cluster has no LeaderWorkerSet and not that many nodes with the GPUs free either (nothing to say
    about installing it: the line stays the one-node attempt and its reasons). Anything
    else: `best`, with why it does not span nodes when the cluster could (LeaderWorkerSet installed).
    """
    if best.feasible or largest.pool.gpu is None or not out_of_one_node(largest):
        return best
    rel = release_for(largest.model, "vllm") if largest.runtime == "vllm" else None
    if largest.runtime != "vllm" or rel is None or rel.id not in MULTINODE_RELEASES:
        if leaderworkerset:
            probe = Candidate(largest.model, largest.quant, largest.kv_cache_dtype, largest.pool,
                              largest.gpus_per_replica, largest.rung, nodes_per_replica=2)
            best.reasons.append(span_problem(probe, leaderworkerset) or "")
        return best
    for nodes in range(2, MAX_NODES_PER_REPLICA + 1):
        c = Candidate(largest.model, largest.quant, largest.kv_cache_dtype, largest.pool, largest.gpus_per_replica,
                      largest.rung, nodes_per_replica=nodes)
        check(c)
        if c.estimate is None:
            return best
        if not out_of_one_node(c):
            if not leaderworkerset and c.pool.slots(c.gpus_per_replica, 0, 0) < nodes:
                return best  # the cluster could not hold it either: no word about LeaderWorkerSet
            problem = span_problem(c, leaderworkerset)
            if problem:
                c.reasons.insert(0, problem)
            return c
    return best
