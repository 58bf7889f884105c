"""Fit the estimator's decode constants to the published llama.cpp measurements, and print JSON.

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
    print(json.dumps({
        "fitted": best[1],
        "committed": original,
        "medianAbsoluteError": calibration.median_abs_error(rows),
        "maxAbsoluteError": max(abs(r.error) for r in rows),
        "rows": [{"model": r.model, "variant": r.variant, "hardware": r.hardware,
                  "measured": r.measured, "predicted": round(r.predicted, 2),
                  "error": round(r.error, 4)} for r in rows],
    }, indent=1))


if __name__ == "__main__":
    main()
