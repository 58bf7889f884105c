"""The speculative-decoding speed model (llama_operator/drafting.py) against published measurements: the rows of
speculative-rows.json (vLLM draft_model, Llama 3.3 70B <- Llama 3.2 1B, 2x H100, k = 3..8, concurrency 1..64),
each predicted by estimate_with_draft at the acceptance measured in that run.

Shared by benchmarks/calibrate_speculative.py (which fits VLLM_DRAFT_PASS_SECONDS on the concurrency-1 rows and
prints the errors) and tests/unit/test_speculative_calibration.py (which holds the error bounds with the
committed constant).
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from calibration.compare import Comparison
from llama_operator import drafting
from llama_operator.catalog import load_catalog
from llama_operator.estimate import Hardware, Workload

HERE = Path(__file__).resolve().parent
DATA = json.loads((HERE / "speculative-rows.json").read_text())
#: The rows the model is checked on (the others say why not: notCheckedBecause).
ROWS = [r for r in DATA["rows"] if r["checked"]]
NOT_CHECKED = [r for r in DATA["rows"] if not r["checked"]]
#: The runs' --max-model-len.
CONTEXT_LENGTH = 5000
#: VLLM_DRAFT_PASS_SECONDS is fitted on these rows' concurrency; the others are held out.
FIT_CONCURRENCY = 1
#: Where the runs with a draft had a full KV cache and queued requests (speculative-rows.json
#: kvCacheAtConcurrency64): the model assumes every request runs, so it is reported, bounded only loosely.
KV_FULL_CONCURRENCY = 64


def alpha(row) -> float:
    """The per-token acceptance of the run itself: alpha_for_rate((AL - 1) / k, k), AL = 1 + accepted / drafts."""
    k = row["k"]
    length = 1.0 + row["acceptedTokens"] / row["drafts"]
    return drafting.alpha_for_rate((length - 1.0) / k, k)


def workload(row) -> Workload:
    return Workload(CONTEXT_LENGTH, row["concurrency"], round(row["meanPromptTokens"]))


def _models(row):
    catalog = load_catalog()
    target, draft = catalog.model(row["target"]), catalog.model(row["draft"])
    quant = catalog.quantizations[row["quantization"]]
    hw = Hardware(gpu=catalog.find_gpu(row["gpu"]), gpu_count=row["gpus"])
    assert hw.gpu is not None, row["gpu"]
    return target, quant, draft, hw


def estimate_row(row, alpha_value: float | None = None, k: int | None = None) -> drafting.DraftEstimate:
    """estimate_with_draft for the row's run, with the committed constants (the run's own alpha and k unless
    given)."""
    target, quant, draft, hw = _models(row)
    k = k or row["k"]
    a = alpha(row) if alpha_value is None else alpha_value
    return drafting.estimate_with_draft(target, quant, draft, quant, hw, workload(row), a, k)


@dataclass(frozen=True)
class Parts:
    """A row's predicted step, taken apart so that the draft's per-pass cost can vary: speedup(p) =
    base x tokens per pass / (verifying pass + k x (draft decode step + p)), drafting.speculative_step's formula."""

    base_seconds: float
    verify_seconds: float
    draft_step_seconds: float
    tokens_per_pass: float
    k: int
    measured: float

    def speedup(self, pass_seconds: float) -> float:
        step = self.verify_seconds + self.k * (self.draft_step_seconds + pass_seconds)
        return self.base_seconds * self.tokens_per_pass / step


def parts(row) -> Parts:
    e = estimate_row(row)
    return Parts(e.speedup * e.tpot_seconds, e.verify_seconds, e.draft_step_seconds, e.tokens_per_pass, row["k"],
                 row["measuredSpeedup"])


def _comparison(row, predicted: float) -> Comparison:
    return Comparison(f"k={row['k']} c={row['concurrency']}", row["target"], f"{row['quantization']} <- {row['draft']}",
                      f"{row['gpus']}x {row['gpu']}", row["measuredSpeedup"], predicted, row["source"])


def comparisons(rows=None, pass_seconds: float | None = None) -> list[Comparison]:
    """Measured against predicted speedup: with the committed constant (estimate_with_draft itself), or with
    `pass_seconds` as VLLM_DRAFT_PASS_SECONDS."""
    rows = ROWS if rows is None else rows
    if pass_seconds is None:
        return [_comparison(r, estimate_row(r).speedup) for r in rows]
    return [_comparison(r, parts(r).speedup(pass_seconds)) for r in rows]


def fit_rows(rows=None) -> list:
    return [r for r in (ROWS if rows is None else rows) if r["concurrency"] == FIT_CONCURRENCY]


def fit_draft_pass_seconds(rows) -> float:
    """VLLM_DRAFT_PASS_SECONDS minimising the sum of log(predicted / measured speedup)^2 over `rows` (golden
    section search on 0..10 ms: the loss has one minimum there, the predicted speedup falling as the cost rises)."""
    ps = [parts(r) for r in rows]

    def loss(p: float) -> float:
        return sum(math.log(x.speedup(p) / x.measured) ** 2 for x in ps)

    lo, hi = 0.0, 0.01
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(100):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if loss(a) < loss(b):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


def by_concurrency(rows: list[Comparison]) -> dict[int, list[Comparison]]:
    out: dict[int, list[Comparison]] = {}
    for r in rows:
        out.setdefault(int(r.what.split("c=")[1]), []).append(r)
    return dict(sorted(out.items()))


def by_k(rows: list[Comparison]) -> dict[int, list[Comparison]]:
    out: dict[int, list[Comparison]] = {}
    for r in rows:
        out.setdefault(int(r.what.split()[0].removeprefix("k=")), []).append(r)
    return dict(sorted(out.items()))


def errors(rows: list[Comparison]) -> dict:
    """Median and extremes of predicted / measured - 1 (signed: positive is an overprediction)."""
    e = [r.error for r in rows]
    return {"rows": len(e), "medianError": round(statistics.median(e), 4), "minError": round(min(e), 4),
            "maxError": round(max(e), 4), "maxAbsoluteError": round(max(abs(x) for x in e), 4)}


def leave_one_k_out() -> tuple[dict[int, float], list[Comparison]]:
    """For each k: VLLM_DRAFT_PASS_SECONDS refitted on the concurrency-1 rows of the other k, that k's rows at
    every concurrency predicted with it. (refits by k, comparisons)"""
    refits, out = {}, []
    for k in sorted({r["k"] for r in ROWS}):
        refits[k] = fit_draft_pass_seconds([r for r in fit_rows() if r["k"] != k])
        out += comparisons([r for r in ROWS if r["k"] == k], refits[k])
    return refits, out
