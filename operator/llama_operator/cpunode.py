"""llama.cpp on CPU nodes: the rates its CPU kernels reach (docs/estimator.md, "CPU").

Decode streams the weights at a share of the node's peak memory bandwidth; prompts (and a draft's verifying
pass) run at a rate per thread that stops growing past 16 threads. The constants are fitted by
benchmarks/calibrate_estimator.py on the mainline CPU rows of benchmarks/calibration/prefill-facts-used.json
(benchmarks/calibration/cpu.py), which also shows each machine predicted by the constants refitted without it.
"""
from __future__ import annotations

from .catalog import ModelArch, Quantization
from .prefill import attention_flops

#: CPU decode: share of the node's peak memory bandwidth (channels x transfer rate x 8 bytes: what the node label
#: gives) that mainline llama.cpp's batch-1 decode reaches. Fitted (least absolute log error: the median run) on
#: the 10 CPU decode rows of prefill-facts-used.json (Ryzen 9 7950X, Threadripper PRO 5975WX, Apple M2 Max,
#: AWS m7i, m7a, m6i, Graviton4; llama.cpp builds of 2024). The runs split in two: 0.50-0.63 where the threads
#: can draw the node's bandwidth (the 7950X, m7i, Graviton4), 0.24-0.29 where they cannot (8 threads on one
#: Threadripper chiplet, an M2 Max's CPU cluster, two sockets, an m7a whose row does not say why); the fit is the
#: first group's, and docs/estimator.md shows what leaving one machine out does to it.
CPU_BANDWIDTH_EFFICIENCY = 0.51
#: CPU prefill: FLOP/s one llama.cpp thread reaches on quantized weights (Q4_0, Q8_0: repacked, int8 dot
#: products), and the share of it 16-bit weights reach; the rate grows with threads up to
#: CPU_PREFILL_MAX_THREADS and no further (32 threads on a Threadripper and 96 on AWS m7i, m7a, Graviton4
#: prefill no faster per token than 16 on a Ryzen 9 7950X; an assumption the rows support, not a fit: they
#: cannot tell it from the cores' speed). The rate and the share are fitted (least absolute log error) on the 16
#: mainline CPU prefill rows of prefill-facts-used.json; the 2.55 TFLOPS used before was a fork's (ik_llama.cpp).
CPU_PREFILL_FLOPS_PER_THREAD = 0.1325e12
CPU_PREFILL_16BIT_SHARE = 0.59
CPU_PREFILL_MAX_THREADS = 16


def cpu_flops_rate(quant: Quantization, threads: int) -> float:
    """FLOP/s llama.cpp's CPU matmuls reach over a batch of tokens (prefill, a draft's verifying pass) with
    `threads` threads: the fitted rate per thread up to CPU_PREFILL_MAX_THREADS, less for 16-bit weights."""
    rate = CPU_PREFILL_FLOPS_PER_THREAD * min(max(1, threads), CPU_PREFILL_MAX_THREADS)
    return rate * (CPU_PREFILL_16BIT_SHARE if quant.bits >= 16 else 1.0)


def cpu_prefill_seconds(arch: ModelArch, prompt: int, weights: int, active_parameters: float, flops_rate: float,
                        bandwidth: float) -> float:
    """2 x parameters x tokens plus causal attention FLOPs at the threads' rate (cpu_flops_rate), never faster
    than one pass over the weights at the decode bandwidth."""
    flops = 2 * active_parameters * prompt + attention_flops(arch, prompt)
    return max(flops / flops_rate, weights / bandwidth)
