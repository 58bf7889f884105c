"""The estimate of a vLLM replica spanning nodes: `nodes` nodes of `gpu_count` GPUs each, tensor parallel inside
a node (TP = GPUs per node, NVLink), pipeline parallel across the nodes (PP = nodes), as vLLM documents the
layout (docs/serving/parallelism_scaling.md: 2 nodes x 8 GPUs, --tensor-parallel-size 8
--pipeline-parallel-size 2). Pure functions; the formulas are in docs/estimator.md, "Across nodes".

* Memory: each pipeline stage holds its share of the layers and their KV cache, split again over the node's
  GPUs, so a GPU holds (weights + adapters + KV cache) / (GPUs per node x nodes) plus its runtime overhead
  (vLLM's, as on one node at that tensor-parallel size); the replica's total counts every GPU's overhead.
* Decode: the stages run one after another for a token, so one step is the sum of the stages: the whole
  model's step at TP = GPUs per node (estimate.estimate on one node's GPUs), plus (nodes - 1) hops between
  stages. A hop is the network's fixed latency plus the activations it carries (vLLM's Llama sends
  `hidden_states` and `residual`, two hidden-size 16-bit vectors per sequence) at the network's bandwidth.
* Prefill: likewise, the one-node prefill at TP = GPUs per node plus (nodes - 1) hops carrying the prompt
  batch's activations (concurrency x prompt tokens).
* Startup: every node downloads the checkpoint (each loads its stage from the same files), in parallel, at
  the rate the renderer's startup probe allows for (30 s per GiB).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .catalog import Model, Quantization, load_catalog
from .estimate import Estimate, GiB, Hardware, Workload, _overhead_bytes, _vllm_gpu_memory_utilization, estimate

#: Tensors vLLM's Llama models pass from one pipeline stage to the next, per token: `hidden_states` and
#: `residual`, each of hidden size (vllm model_executor/models/llama.py, LlamaModel:
#: make_empty_intermediate_tensors_factory(["hidden_states", "residual"], config.hidden_size)).
PIPELINE_TENSORS_PER_TOKEN = 2
#: Bytes per activation element: the 16-bit dtype vLLM computes in (also for FP8/AWQ weights).
ACTIVATION_BYTES = 2
#: Download rate a starting server is given: the renderer's startup probe allows 30 s per GiB of weights
#: (render._startup_failure_threshold), i.e. GiB / 30 s = 35.8 MB/s.
STARTUP_DOWNLOAD_BYTES_PER_SECOND = GiB / 30
#: What a vLLM server takes to start besides the download (the renderer's probe allows 10 minutes).
STARTUP_FIXED_SECONDS = 600.0


@dataclass(frozen=True)
class PipelineEstimate(Estimate):
    """An Estimate of a replica spanning `nodes` nodes, with what the span adds."""

    nodes: int = 1
    network_gbps: float = 0.0
    hop_seconds: float = 0.0  # one decode step's hop between two stages
    startup_seconds: float = 0.0


def hop_seconds(model: Model, tokens: int, network_gbps: float) -> float:
    """One hop between two pipeline stages carrying `tokens` tokens' activations: the network's fixed latency
    (catalog `network.hopLatencySeconds`) plus the bytes at `network_gbps` (Gbit/s)."""
    latency = load_catalog().network.hop_latency_seconds
    data = PIPELINE_TENSORS_PER_TOKEN * model.arch.hidden_size * ACTIVATION_BYTES * max(1, tokens)
    return latency + data * 8 / (network_gbps * 1e9)


def startup_seconds(weights_bytes: int) -> float:
    """Time for a node to start serving: the fixed start plus the checkpoint's download (every node
    downloads it, in parallel)."""
    return STARTUP_FIXED_SECONDS + weights_bytes / STARTUP_DOWNLOAD_BYTES_PER_SECOND


def estimate_pipeline(model: Model, quant: Quantization, hw: Hardware, workload: Workload, nodes: int,
                      network_gbps: float, *, adapter_ranks: tuple[int, ...] = (),
                      in_flight: bool = False) -> PipelineEstimate:
    """Memory and latency of one vLLM replica of `nodes` nodes with `hw.gpu_count` GPUs each (see the module's
    docstring), the nodes joined by `network_gbps` Gbit/s."""
    assert quant.runtime == "vllm" and hw.gpu is not None and nodes >= 1 and network_gbps > 0
    one = estimate(model, quant, hw, workload, adapter_ranks=adapter_ranks, in_flight=in_flight)
    gpus = hw.gpu_count * nodes
    # every GPU holds vLLM's overhead at a world size of `gpus` (NCCL's buffers too: the stages talk over NCCL)
    overhead, overhead_per_gpu = _overhead_bytes(model, quant, replace(hw, gpu_count=gpus))
    held = one.weights_bytes + one.adapter_bytes + one.kv_cache_bytes
    per_gpu = -(-held // gpus) + overhead_per_gpu
    hops = nodes - 1
    decode_hop = hop_seconds(model, workload.concurrency, network_gbps)
    prefill_hop = hop_seconds(model, workload.concurrency * workload.prompt_tokens, network_gbps)
    tpot = one.tpot_seconds + hops * decode_hop
    base = replace(
        one,
        overhead_bytes=overhead,
        total_bytes=held + overhead,
        per_gpu_bytes=per_gpu,
        ttft_seconds=one.ttft_seconds + hops * prefill_hop,
        tpot_seconds=tpot,
        decode_tokens_per_second=1.0 / tpot,
        gpu_memory_utilization=_vllm_gpu_memory_utilization(quant, hw, per_gpu),
    )
    fields = {f: getattr(base, f) for f in Estimate.__dataclass_fields__}
    return PipelineEstimate(**fields, nodes=nodes, network_gbps=network_gbps, hop_seconds=decode_hop,
                            startup_seconds=startup_seconds(one.weights_bytes))
