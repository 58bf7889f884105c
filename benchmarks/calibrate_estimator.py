"""Fit the estimator's decode and prefill constants to the published measurements, and print JSON.

Decode: a grid search over llama.cpp tg rows (llama-facts-used.json). Prefill: relative least squares of the
llama.cpp prefill constants on prefill-rows.json's pp512 and pp4096 rows, with leave-one-GPU-out (the constants
refitted without each GPU, that GPU predicted), and of the vLLM TTFT constants on vllm-ttft-rows.json, with
leave-one-row-out and leave-one-GPU-out.

The fitted values are copied by hand into llama_operator/estimate.py (constants are code, reviewed);
tests/unit/test_estimator_calibration.py then checks the error bounds with what is committed.
Usage: .venv/bin/python benchmarks/calibrate_estimator.py
"""
from __future__ import annotations

import itertools
import json
import math

from calibration import compare as calibration
from llama_operator import estimate as est
from llama_operator import prefill

PARAMETERS = {
    "DECODE_BANDWIDTH_EFFICIENCY_16BIT": [0.70, 0.75, 0.80, 0.86, 0.92],
    "DECODE_BANDWIDTH_EFFICIENCY_QUANTIZED": [0.80, 0.86, 0.92, 0.98],
    "DECODE_SECONDS_PER_PARAMETER_16BIT": [0.0, 0.05e-12, 0.10e-12, 0.20e-12],
    "DECODE_SECONDS_PER_PARAMETER_QUANTIZED": [0.2e-12, 0.3e-12, 0.42e-12, 0.55e-12],
    "LLAMACPP_MAX_EFFECTIVE_BANDWIDTH_GBPS_16BIT": [800.0, 900.0, 1000.0, 1100.0, 1e9],
    "LLAMACPP_MAX_EFFECTIVE_BANDWIDTH_GBPS_QUANTIZED": [600.0, 700.0, 800.0, 900.0, 1e9],
}


def loss() -> float:
    """Sum of squared log errors: symmetric in over- and under-prediction."""
    return sum(math.log(r.predicted / r.measured) ** 2 for r in calibration.decode_comparisons())


def main() -> None:
    original = {name: getattr(est, name) for name in PARAMETERS}
    best = (math.inf, original)
    for values in itertools.product(*PARAMETERS.values()):
        for name, value in zip(PARAMETERS, values):
            setattr(est, name, value)
        current = loss()
        if current < best[0]:
            best = (current, dict(zip(PARAMETERS, values)))
    for name, value in best[1].items():
        setattr(est, name, value)
    rows = calibration.decode_comparisons()
    for name, value in original.items():
        setattr(est, name, value)
    print(json.dumps({
        "decode": {
            "fitted": best[1],
            "committed": original,
            **errors(rows),
            "rows": [{"model": r.model, "variant": r.variant, "hardware": r.hardware,
                      "measured": r.measured, "predicted": round(r.predicted, 2),
                      "error": round(r.error, 4)} for r in rows],
        },
        "llamacppPrefill": llamacpp_prefill(),
        "vllmTtft": vllm_ttft(),
    }, indent=1))


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


if __name__ == "__main__":
    main()
