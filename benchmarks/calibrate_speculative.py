"""Fit the speculative-decoding speed model's one constant to the published measurements, and print JSON.

VLLM_DRAFT_PASS_SECONDS (llama_operator/drafting.py: what one vLLM draft pass costs beyond the draft model's own
decode step) by least squares on log(predicted / measured speedup) over the concurrency-1 rows of
benchmarks/calibration/speculative-rows.json (vLLM draft_model, Llama 3.3 70B bf16 <- Llama 3.2 1B, 2x H100 at
TP 2, InstructCoder, greedy, k = 3..8). Each row is predicted at the acceptance measured in that run
(alpha_for_rate((AL - 1) / k, k)), so the rows test the cost model, not the catalog's acceptance. Printed: the
fitted value against the committed one; the committed model's error per concurrency (1: the fit; 2..32 held out;
64 held out, with the runs' KV cache full: speculative-rows.json kvCacheAtConcurrency64); leave-one-k-out (the
constant refitted without each k's concurrency-1 row, that k predicted at every concurrency); and the draft length
measured and predicted fastest at each concurrency.

The fitted value is copied by hand into llama_operator/drafting.py (constants are code, reviewed);
tests/unit/test_speculative_calibration.py then checks the error bounds with what is committed.
Usage: .venv/bin/python benchmarks/calibrate_speculative.py
"""
from __future__ import annotations

import json

from calibration import speculative as calibration
from llama_operator import drafting


def main() -> None:
    fitted = calibration.fit_draft_pass_seconds(calibration.fit_rows())
    committed = calibration.comparisons()
    refits, logo = calibration.leave_one_k_out()
    held = [r for r in committed if int(r.what.split("c=")[1]) != calibration.FIT_CONCURRENCY]
    bounded = [r for r in held if int(r.what.split("c=")[1]) != calibration.KV_FULL_CONCURRENCY]
    print(json.dumps({
        "fitted": {"VLLM_DRAFT_PASS_SECONDS": round(fitted, 6)},
        "committed": {"VLLM_DRAFT_PASS_SECONDS": drafting.VLLM_DRAFT_PASS_SECONDS},
        "committedByConcurrency": {f"c={c}" + (" (fit)" if c == calibration.FIT_CONCURRENCY else " (held out)"):
                                   calibration.errors(rs) for c, rs in calibration.by_concurrency(committed).items()},
        "committedHeldOut2to32": calibration.errors(bounded),
        "committedHeldOutAll": calibration.errors(held),
        "fittedByConcurrency": {f"c={c}": calibration.errors(rs) for c, rs in
                                calibration.by_concurrency(calibration.comparisons(pass_seconds=fitted)).items()},
        "leaveOneKOut": {
            "refittedMilliseconds": {f"k={k}": round(p * 1e3, 3) for k, p in refits.items()},
            "byConcurrency": {f"c={c}": calibration.errors(rs) for c, rs in calibration.by_concurrency(logo).items()},
            "byK": {f"k={k}": calibration.errors(rs) for k, rs in calibration.by_k(logo).items()},
        },
        "fastestDraftLength": fastest(committed),
        "notChecked": [{"row": f"{r['target']} <- {r['draft']}, {r['runtime']}, {r['gpu']}, k={r['k']}",
                        "measuredSpeedup": r["measuredSpeedup"], "why": r["notCheckedBecause"]}
                       for r in calibration.NOT_CHECKED],
        "rows": [{"k": int(r.what.split()[0][2:]), "concurrency": int(r.what.split("c=")[1]), "measured": r.measured,
                  "predicted": round(r.predicted, 3), "error": round(r.error, 4)} for r in committed],
    }, indent=1))


def fastest(rows) -> dict:
    """The draft length measured fastest, and predicted fastest (committed), at each concurrency."""
    out = {}
    for c, rs in calibration.by_concurrency(rows).items():
        out[f"c={c}"] = {"measured": max(rs, key=lambda r: r.measured).what.split()[0],
                         "predicted": max(rs, key=lambda r: r.predicted).what.split()[0]}
    return out


if __name__ == "__main__":
    main()
