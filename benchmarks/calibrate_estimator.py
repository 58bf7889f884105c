"""Fit the estimator's decode and prefill constants to the published measurements, and print JSON.

Decode: a grid search of llama.cpp's bandwidth caps and fixed time per layer on decode-rows.json's single-GPU
tg512 rows, with the held-out groups (other lengths, layer splits, llama-facts-used.json's rows of other builds)
and leave-one-GPU-out (the constants refitted without each GPU, that GPU's rows predicted). Prefill: relative
least squares of the llama.cpp prefill constants on prefill-rows.json's pp512 and pp4096 rows, with
leave-one-GPU-out (the constants refitted without each GPU, that GPU predicted), and of the vLLM TTFT constants on vllm-ttft-rows.json, with
leave-one-row-out and leave-one-GPU-out. CPU (calibration/cpu.py): least absolute log error of the per-thread
prefill rate, the 16-bit share and the decode bandwidth share on prefill-facts-used.json's mainline CPU rows,
with leave-one-machine-out.

The fitted values are copied by hand into llama_operator/estimate.py, prefill.py and cpunode.py (constants are code, reviewed);
tests/unit/test_estimator_calibration.py then checks the error bounds with what is committed.
Usage: .venv/bin/python benchmarks/calibrate_estimator.py
"""
from __future__ import annotations

import json

from calibration import compare as calibration
from calibration import cpu
from llama_operator import estimate as est
from llama_operator import prefill

DECODE_CONSTANTS = ("LLAMACPP_MAX_EFFECTIVE_BANDWIDTH_GBPS_16BIT", "LLAMACPP_MAX_EFFECTIVE_BANDWIDTH_GBPS_QUANTIZED",
                    "LLAMACPP_DECODE_SECONDS_PER_LAYER")


def main() -> None:
    print(json.dumps({
        "llamacppDecode": llamacpp_decode(),
        "llamacppPrefill": llamacpp_prefill(),
        "vllmTtft": vllm_ttft(),
        "llamacppCpu": llamacpp_cpu(),
    }, indent=1))


def llamacpp_decode() -> dict:
    fitted = calibration.fit_llamacpp_decode(calibration.DECODE)
    rows = calibration.DECODE
    single = [r for r in rows if r.get("gpus", 1) == 1]
    groups = {
        "singleGpuTg512 (fit)": calibration.decode_fit_rows(),
        "singleGpuOtherLengths (held out)": [r for r in single if r not in calibration.decode_fit_rows()],
        "layerSplitMultiGpu (held out)": [r for r in rows if r.get("gpus", 1) > 1],
    }
    refits = {}
    for gpu in sorted({r["hardware"] for r in single}):
        c = calibration.fit_llamacpp_decode([r for r in single if r["hardware"] != gpu])
        refits[gpu] = {"cap16bitGBps": c[0], "capQuantizedGBps": c[1], "tauMicroseconds": round(c[2] * 1e6, 1)}
    logo = calibration.decode_leave_one_gpu_out()
    return {
        "fitted": dict(zip(DECODE_CONSTANTS, fitted)),
        "committed": {name: getattr(est, name) for name in DECODE_CONSTANTS},
        "committedGroups": {name: errors(calibration.decode_comparisons(rs)) for name, rs in groups.items()},
        "committedOtherBuilds (llama-facts-used.json)": errors(calibration.decode_comparisons()),
        "committedEveryDecodeRow": errors(calibration.every_decode_comparisons()),
        "leaveOneGpuOut": {**errors(logo), "perGpu": per_gpu(logo), "refitted": refits},
    }


def errors(rows) -> dict:
    return {"rows": len(rows), "medianAbsoluteError": round(calibration.median_abs_error(rows), 4),
            "maxAbsoluteError": round(max(abs(r.error) for r in rows), 4)}


def per_gpu(rows) -> dict:
    return {gpu: errors(rs) for gpu, rs in calibration.by_gpu(rows).items()}


def llamacpp_prefill() -> dict:
    a16, aq, weight_passes, kq_passes = calibration.fit_llamacpp_prefill(calibration.PREFILL)
    logo = calibration.prefill_leave_one_gpu_out()
    refits = {}
    for gpu in sorted({r["hardware"] for r in calibration.PREFILL}):
        c = calibration.fit_llamacpp_prefill([r for r in calibration.PREFILL if r["hardware"] != gpu])
        refits[gpu] = {"efficiency16bit": round(1 / c[0], 3) if c[0] else None,
                       "efficiencyQuantized": round(1 / c[1], 3) if c[1] else None,
                       "weightPasses": round(c[2], 3), "kqPasses": round(c[3], 3)}
    committed = calibration.prefill_comparisons()
    held = [r for r in committed if int(r.what.removeprefix("prefill pp")) not in calibration.LLAMACPP_PREFILL_FIT_ROWS]
    return {
        "fitted": {"LLAMACPP_PREFILL_EFFICIENCY_16BIT": round(1 / a16, 4),
                   "LLAMACPP_PREFILL_EFFICIENCY_QUANTIZED": round(1 / aq, 4),
                   "LLAMACPP_PREFILL_WEIGHT_PASSES": round(weight_passes, 4),
                   "LLAMACPP_PREFILL_KQ_PASSES": round(kq_passes, 4)},
        "committed": {name: getattr(prefill, name) for name in (
            "LLAMACPP_PREFILL_EFFICIENCY_16BIT", "LLAMACPP_PREFILL_EFFICIENCY_QUANTIZED",
            "LLAMACPP_PREFILL_WEIGHT_PASSES", "LLAMACPP_PREFILL_KQ_PASSES")},
        "committedAllRows": errors(committed),
        "committedHeldOutLengths": errors(held),
        "leaveOneGpuOut": {**errors(logo), "perGpu": per_gpu(logo), "refitted": refits},
    }


def vllm_ttft() -> dict:
    t0, bf16, w8a8, marlin = calibration.fit_vllm_ttft(calibration.VLLM_TTFT["rows"])
    committed = calibration.vllm_ttft_comparisons()
    logo = calibration.vllm_leave_one_gpu_out()
    return {
        "fitted": {"VLLM_REQUEST_OVERHEAD_SECONDS": round(t0, 4), "VLLM_PREFILL_EFFICIENCY_BF16": round(1 / bf16, 4),
                   "VLLM_PREFILL_EFFICIENCY_FP8_W8A8": round(1 / w8a8, 4),
                   "VLLM_PREFILL_EFFICIENCY_MARLIN": round(1 / marlin, 4)},
        "committed": {name: getattr(prefill, name) for name in (
            "VLLM_REQUEST_OVERHEAD_SECONDS", "VLLM_PREFILL_EFFICIENCY_BF16", "VLLM_PREFILL_EFFICIENCY_FP8_W8A8",
            "VLLM_PREFILL_EFFICIENCY_MARLIN")},
        "committedAllRows": errors(committed),
        "leaveOneRowOut": errors(calibration.vllm_leave_one_row_out()),
        "leaveOneGpuOut": {**errors(logo), "perGpu": per_gpu(logo)},
        "rows": [{"model": r.model, "variant": r.variant, "hardware": r.hardware, "measuredMs": r.measured,
                  "predictedMs": round(r.predicted, 1), "error": round(r.error, 4)} for r in committed],
    }


def llamacpp_cpu() -> dict:
    fitted = cpu.fit(cpu.PREFILL, cpu.DECODE)
    left_out = cpu.leave_one_machine_out(cpu.ROWS)
    refits = {}
    for machine in sorted({r.machine for r in cpu.ROWS}):
        c = cpu.fit([r for r in cpu.PREFILL if r.machine != machine], [r for r in cpu.DECODE if r.machine != machine])
        refits[machine] = {"flopsPerThread": c.flops_per_thread, "share16bit": c.share_16bit,
                           "bandwidthShare": c.bandwidth_share}
    return {
        "fitted": {"CPU_PREFILL_FLOPS_PER_THREAD": fitted.flops_per_thread,
                   "CPU_PREFILL_16BIT_SHARE": fitted.share_16bit,
                   "CPU_PREFILL_MAX_THREADS (assumed, not fitted)": fitted.max_threads,
                   "CPU_BANDWIDTH_EFFICIENCY": fitted.bandwidth_share},
        "committedPrefill": errors(cpu.committed_comparisons(cpu.PREFILL)),
        "committedDecode": errors(cpu.committed_comparisons(cpu.DECODE)),
        "leaveOneMachineOutPrefill": errors([c for c in left_out if c.what.startswith("prefill")]),
        "leaveOneMachineOutDecode": errors([c for c in left_out if c.what.startswith("decode")]),
        "refittedWithout": refits,
    }


if __name__ == "__main__":
    main()
