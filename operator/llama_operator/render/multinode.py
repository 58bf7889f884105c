"""One replica over several nodes (issue 14): a LeaderWorkerSet group instead of a Deployment's pod.

When the plan's nodesPerReplica is above 1, vLLM runs one replica as a group of that many pods, one per node:
tensor parallel inside each pod (gpusPerReplica GPUs), pipeline parallel across them, on vLLM's own
multiprocessing executor (the stock image has no Ray). The group is a LeaderWorkerSet (kubernetes-sigs/lws
v0.10.0): pod 0, the leader, runs `vllm serve` with its API server, the workers run `vllm serve --headless`
and join the leader's torch.distributed rendezvous at $(LWS_LEADER_ADDRESS). Every fact of vLLM's command
line is catalog/engines.yaml `multiNode`, cited; docs/multinode.md.

Naming. The LeaderWorkerSet controller makes a headless Service named like the LeaderWorkerSet, and the
operator's client Service is named like the LlamaDeployment, so the LeaderWorkerSet is `<name>-group`. Its
leader StatefulSet is named like it, each group's worker StatefulSet `<lws>-<group>`, and their pods
`<lws>-<group>` and `<lws>-<group>-<worker>`. A StatefulSet's pods carry the label controller-revision-hash
= `<statefulset>-<10-character hash>`, which must be a label value (at most 63 characters), so a StatefulSet
name over 52 characters leaves its pods uncreatable (kubernetes/kubernetes#64023, open). With group indices
of up to 6 digits (LeaderWorkerSet allows 1000000 replicas, leaderworkerset_webhook.go:130-137), the name of
the LeaderWorkerSet is therefore at most ownership.GROUP_NAME_MAX = 52 - 1 - 6 = 45 characters, and every pod name (a
hostname, in LWS_LEADER_ADDRESS) stays under 63. A LlamaDeployment name of up to 39 characters gives
`<name>-group`; a longer one is cut to 30 characters (and any trailing '-') and followed by 8 hex digits of
the sha256 of the whole name: `<first 30>-<hash8>-group`, 45 characters at most, a DNS-1035 label.
"""
from __future__ import annotations

from typing import Any

from ..engines import EngineRelease
from ..ownership import LABEL_DEPLOYMENT, MANAGED_BY, group_name
from ..status import ChosenPlan

#: The LeaderWorkerSet API the group is rendered for (kubernetes-sigs/lws v0.10.0, tests/vendor/lws).
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
#: Labels the LeaderWorkerSet controller puts on every pod of a group (its name), and on the leader pods
#: (worker index "0"): api/leaderworkerset/v1/leaderworkerset_types.go:37, :45;
#: pkg/controllers/leaderworkerset_controller.go:793-799.
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
#: Stands for the group's name in a render with the stand-in owner (render.__init__ replaces it).
GROUP_NAME_MARK = "\x02group\x02"
#: The name of the leader's rendezvous port (torch.distributed's TCP store, engines.yaml multiNode.masterPort).
DIST_PORT_NAME = "dist"


def multinode_context(name: str, plan: ChosenPlan, rel: EngineRelease, labels: dict[str, str],
                      stand_in: bool) -> dict[str, Any]:
    """What the templates read of a replica over several nodes: `nodes` always (1: a Deployment's pod), and
    `mn` when it is more (None otherwise). `stand_in`: rendering for the stand-in owner, whose group name
    is the mark the owner's is put in place of."""
    nodes = plan.nodesPerReplica
    if nodes == 1:
        return {"nodes": 1, "mn": None}
    if plan.runtime != "vllm" or rel.multi_node is None:
        raise ValueError(f"{rel.title} is not rendered over several nodes (plan: {nodes} nodes per replica); "
                         "only vLLM runs one replica across nodes")
    multi = rel.multi_node
    flags, env = multi.flags, multi.lws_env
    lws = GROUP_NAME_MARK if stand_in else group_name(name)
    # TP = GPUs per node (the base command line's --tensor-parallel-size), PP = nodes: each TP group inside
    # a node, only the pipeline stages cross the network (engines.yaml multiNode.layout).
    distributed = [flags["pipelineParallel"], str(nodes), flags["executorBackend"], multi.executor_backend,
                   flags["nnodes"], str(nodes), flags["nodeRank"], f"$({env['workerIndex']})",
                   flags["masterAddr"], f"$({env['leaderAddress']})", flags["masterPort"], str(multi.master_port)]
    return {
        "nodes": nodes,
        "mn": {
            "api_version": LWS_API_VERSION,
            "group_name": lws,
            "distributed_args": distributed,
            "headless_flag": flags["headless"],
            "dist_port": multi.master_port,
            "dist_port_name": DIST_PORT_NAME,
            "host_ip_env": multi.host_ip_env,
            # Workers serve no API: without the managed-by label they are not selected by the Service (which
            # selects as for a Deployment, so the leaders of a new group and the pods of a Deployment it replaces
            # serve side by side while one kind replaces the other), nor scraped by the SLO loop, while the
            # LlamaDeployment's label still says whose GPUs they hold.
            "worker_labels": {k: v for k, v in labels.items() if k not in MANAGED_BY},
            "group_peer": {LWS_NAME_LABEL: lws},
            "all_pods": {LABEL_DEPLOYMENT: labels[LABEL_DEPLOYMENT]},
        },
    }
