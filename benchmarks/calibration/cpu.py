"""llama.cpp on CPU nodes against published measurements: the mainline CPU rows of prefill-facts-used.json
(prefill pp512 and decode tg128/tg256 on a Ryzen 9 7950X, a Threadripper PRO 5975WX, an Apple M2 Max and AWS
m7i, m7a, m6i and Graviton4 instances), the only public CPU rows of the llama.cpp the operator runs.

The estimator's CPU prefill constants (FLOP/s per thread on quantized weights, the share 16-bit weights reach;
the thread count past which the rate stops growing is assumed, fit() says why) and its CPU decode bandwidth
share are fitted here;
what shows the fit generalises is each machine predicted by the constants refitted without it (leave one
machine out), and, for the 16-bit share, which only the 7950X measures, each 16-bit row predicted by the share
refitted on the other.

Shared by benchmarks/calibrate_estimator.py (prints the fit), tests/unit/test_estimator_calibration.py (holds
the committed constants to it and the errors to their bounds) and compare.py (the tables in docs/estimator.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from calibration.compare import (FACTS_USED, Comparison, _decode_workload, _prompt, facts_decode_test, facts_threads,
                                 model_id, quant_id)
from llama_operator import cpunode
from llama_operator import estimate as est
from llama_operator.catalog import load_catalog
from llama_operator.prefill import attention_flops

#: Grids searched (every committed constant lies on them).
FLOPS_PER_THREAD_GRID = [round(0.050e12 + i * 0.0025e12, 1) for i in range(101)]  # 0.05 .. 0.30 TFLOPS
SHARE_16BIT_GRID = [round(0.30 + i * 0.01, 2) for i in range(91)]  # 0.30 .. 1.20
BANDWIDTH_SHARE_GRID = [round(0.20 + i * 0.01, 2) for i in range(81)]  # 0.20 .. 1.00


@dataclass(frozen=True)
class CpuRow:
    """What the estimator needs of one measured CPU run, and what it measured."""

    row: dict
    machine: str
    threads: int  # the threads the run used, at most the machine's cores
    bandwidth_gbps: float  # the machine's peak memory bandwidth (prefill-facts-used.json "hardware")
    sixteen_bit: bool
    tokens: int  # prompt tokens (prefill); 1 (decode)
    flops: float  # of the whole prompt (prefill), of one step (decode)
    bytes: float  # the weights (prefill), what one step reads (decode)
    measured: float  # tokens/s

    @property
    def decode(self) -> bool:
        return "decode" in self.row["metric"]


def _cpu_row(row) -> CpuRow:
    catalog = load_catalog()
    model = catalog.model(model_id(row["model"]))
    quant = catalog.quantizations[quant_id(row["variant"])]
    spec = FACTS_USED["hardware"][row["hardware"]]
    active = est.parameter_counts(model.arch).active_per_token
    weights = est.weights_bytes(model, quant)
    common = dict(row=row, machine=row["hardware"], threads=min(facts_threads(row), spec["cpuCores"]),
                  bandwidth_gbps=spec["bandwidthGBps"], sixteen_bit=quant.bits >= 16, measured=float(row["value"]))
    if "decode" in row["metric"]:
        workload = _decode_workload({**row, "metric": facts_decode_test(row)})
        return CpuRow(**common, tokens=1, flops=2 * active,
                      bytes=weights + est.kv_read_bytes_per_step(model.arch, workload))
    n = _prompt(row)
    return CpuRow(**common, tokens=n, flops=2 * active * n + attention_flops(model.arch, n), bytes=weights)


ROWS = [_cpu_row(r) for r in FACTS_USED["rows"] if "cpuCores" in FACTS_USED["hardware"][r["hardware"]]]
PREFILL = [r for r in ROWS if not r.decode]
DECODE = [r for r in ROWS if r.decode]


@dataclass(frozen=True)
class CpuConstants:
    flops_per_thread: float
    max_threads: int
    share_16bit: float
    bandwidth_share: float

    @classmethod
    def committed(cls) -> CpuConstants:
        return cls(cpunode.CPU_PREFILL_FLOPS_PER_THREAD, cpunode.CPU_PREFILL_MAX_THREADS,
                   cpunode.CPU_PREFILL_16BIT_SHARE, cpunode.CPU_BANDWIDTH_EFFICIENCY)


def predict(c: CpuConstants, r: CpuRow) -> float:
    """Tokens/s as estimate() computes it on a CPU node (tests/unit/test_estimator_calibration.py checks the
    two agree): the longer of the FLOPs at the threads' rate and the bytes at the bandwidth's share."""
    rate = c.flops_per_thread * min(r.threads, c.max_threads) * (c.share_16bit if r.sixteen_bit else 1.0)
    return r.tokens / max(r.flops / rate, r.bytes / (r.bandwidth_gbps * 1e9 * c.bandwidth_share))


def _score(c: CpuConstants, rows: list[CpuRow]) -> tuple[float, float]:
    """Sum of absolute log errors (for one constant: the median ratio), which the few runs far below every other
    (two sockets, eight threads on a chiplet part) do not drag as squares would; ties (an
    even number of rows) broken by the sum of squared log errors (the geometric mean)."""
    logs = [math.log(predict(c, r) / r.measured) for r in rows]
    return sum(abs(x) for x in logs), sum(x * x for x in logs)


def fit(prefill_rows: list[CpuRow], decode_rows: list[CpuRow],
        fallback: CpuConstants | None = None) -> CpuConstants:
    """The grid point of least absolute log error (_score): the per-thread rate on the quantized prefill rows,
    then the 16-bit share on the 16-bit ones, then the bandwidth share on the decode rows. A constant no row
    measures keeps `fallback`'s value (the committed one by default).

    The thread limit is not fitted: the rows cannot tell it from the cores' speed (an Apple M2 Max's 8 threads
    prefill like a Ryzen 9 7950X's 16, each of its cores being faster), so it is the planner's 16 threads,
    where the rows show the rate stop growing (32 to 96 threads no faster than 16 per token)."""
    fallback = fallback or CpuConstants.committed()
    quantized = [r for r in prefill_rows if not r.sixteen_bit]
    sixteen = [r for r in prefill_rows if r.sixteen_bit]
    rate, limit = fallback.flops_per_thread, fallback.max_threads
    if quantized:
        _, rate = min((_score(CpuConstants(f, limit, 1.0, 1.0), quantized), f) for f in FLOPS_PER_THREAD_GRID)
    share = fallback.share_16bit
    if sixteen:
        _, share = min((_score(CpuConstants(rate, limit, s, 1.0), sixteen), s) for s in SHARE_16BIT_GRID)
    bandwidth = fallback.bandwidth_share
    if decode_rows:
        _, bandwidth = min((_score(CpuConstants(rate, limit, share, b), decode_rows), b)
                           for b in BANDWIDTH_SHARE_GRID)
    return CpuConstants(rate, limit, share, bandwidth)


def comparison(c: CpuConstants, r: CpuRow, note: str = "") -> Comparison:
    what = f"decode {facts_decode_test(r.row)}" if r.decode else f"prefill pp{r.tokens}"
    hardware = f"{r.machine.split(' (')[0].split(',')[0]} ({r.threads} threads, {r.bandwidth_gbps:g} GB/s)"
    return Comparison(what + note, model_id(r.row["model"]), quant_id(r.row["variant"]), hardware, r.measured,
                      predict(c, r), r.row["source"])


def committed_comparisons(rows: list[CpuRow]) -> list[Comparison]:
    c = CpuConstants.committed()
    return [comparison(c, r) for r in rows]


def leave_one_machine_out(rows: list[CpuRow]) -> list[Comparison]:
    """Each machine's rows predicted by the constants refitted on every other machine's rows (prefill and
    decode alike); the 16-bit rows, all on one machine, by the share refitted on the other 16-bit row."""
    out = []
    for machine in sorted({r.machine for r in rows}):
        rest_prefill = [r for r in PREFILL if r.machine != machine]
        rest_decode = [r for r in DECODE if r.machine != machine]
        refitted = fit(rest_prefill, rest_decode)
        for r in rows:
            if r.machine != machine:
                continue
            if r.sixteen_bit:
                others = [o for o in PREFILL if o.sixteen_bit and o is not r]
                out.append(comparison(fit(rest_prefill + others, rest_decode), r, " (16-bit: the other row's share)"))
            else:
                out.append(comparison(refitted, r))
    return out
