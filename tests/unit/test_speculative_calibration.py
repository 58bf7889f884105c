"""The speculative-decoding speed model (llama_operator/drafting.py) against published measurements
(benchmarks/calibration/speculative-rows.json: vLLM draft_model, Llama 3.3 70B bf16 <- Llama 3.2 1B, 2x H100 at
TP 2, InstructCoder, greedy, k = 3..8, concurrency 1..64), each row predicted at the acceptance measured in that
run, so the rows test the cost model.

Bounds, with the committed VLLM_DRAFT_PASS_SECONDS (fitted on the concurrency-1 rows by
benchmarks/calibrate_speculative.py). Measured when they were set: concurrency 1 (the fit) within 1.3%, held: 2%;
held-out concurrency 2..32 each row within 8.6% and each concurrency's median within 5.9% (c=2 +5.9%, 4 +4.9%,
8 +2.2%, 16 +1.0%, 32 +5.4%; 26 of the 30 rows overpredict), held: 10% a row, 6% a concurrency's median.
Concurrency 64 overpredicts every k by 14-20% (median 18.5%): the runs with a draft had their KV cache full and
queued requests (speculative-rows.json kvCacheAtConcurrency64) while the model runs all 64, so it is bounded
loosely: an overprediction, at most 25%.
"""
from __future__ import annotations

import statistics
from itertools import pairwise

from calibration import compare
from calibration import speculative as calibration

from llama_operator import drafting
from llama_operator.catalog import load_catalog

HELD_OUT = (2, 4, 8, 16, 32)
CONCURRENCIES = (1, *HELD_OUT, calibration.KV_FULL_CONCURRENCY)
KS = range(3, 9)


def _row(k: int, c: int) -> dict:
    (row,) = [r for r in calibration.ROWS if r["k"] == k and r["concurrency"] == c]
    return row


def test_rows_are_the_whole_grid_as_logged():
    """Every cell of the grid, its speedup the ratio of the two logged throughputs, its acceptance the counters'."""
    assert sorted((r["k"], r["concurrency"]) for r in calibration.ROWS) == [(k, c) for k in KS for c in CONCURRENCIES]
    for r in calibration.ROWS:
        assert r["measuredSpeedup"] == round(r["outputTokensPerSecond"] / r["baselineOutputTokensPerSecond"], 4)
        assert abs(1 + r["acceptedTokens"] / r["drafts"] - r["acceptanceLength"]) <= 0.005 + 1e-9
        assert abs(r["acceptedTokens"] / r["draftTokens"] - r["acceptanceRate"]) <= 0.00005 + 1e-9
        assert r["draftTokens"] == r["k"] * r["drafts"]
        assert r["source"] and r["baselineSource"]
    # Rows outside the check say why; the llama.cpp row's GPU is not in the catalog to predict it on.
    assert calibration.NOT_CHECKED and all(r["notCheckedBecause"] for r in calibration.NOT_CHECKED)
    for r in calibration.NOT_CHECKED:
        assert load_catalog().find_gpu(r["gpu"]) is None and r["gpu"] not in compare.EXTRA["gpus"], \
            f"{r['gpu']} can be predicted now: check the row"


def test_the_fit_takes_drafting_speculative_step_apart_faithfully():
    """The fit varies the per-pass cost on the rows' parts; at the committed value they give estimate_with_draft's
    own speedup."""
    for r in calibration.ROWS:
        parts = calibration.parts(r).speedup(drafting.VLLM_DRAFT_PASS_SECONDS)
        assert abs(parts / calibration.estimate_row(r).speedup - 1) < 1e-9


def test_committed_draft_pass_cost_is_the_fitted_one():
    """VLLM_DRAFT_PASS_SECONDS is the concurrency-1 fit to its 0.1 ms (the fit gives 1.215 ms); leaving any
    one k out moves the fit by less than 0.05 ms."""
    fitted = calibration.fit_draft_pass_seconds(calibration.fit_rows())
    assert round(fitted, 4) == drafting.VLLM_DRAFT_PASS_SECONDS, fitted
    refits, _ = calibration.leave_one_k_out()
    for k, p in refits.items():
        assert abs(p - fitted) < 0.00005, (k, p)


def _table(rows) -> str:
    table = compare.table(rows)
    print("\n" + table)
    return table


def test_concurrency_1_the_fit():
    rows = calibration.comparisons(calibration.fit_rows())
    table = _table(rows)
    assert len(rows) == 6
    worst = max(rows, key=lambda r: abs(r.error))
    assert abs(worst.error) <= 0.02, f"{worst.what}: {worst.error:+.1%}\n{table}"


def test_held_out_concurrency_2_to_32():
    """Each row within 10%, each concurrency's median within 6%, with the committed constant; and the same
    bounds when the constant is refitted without the row's k (leave-one-k-out)."""
    committed = calibration.comparisons([r for r in calibration.ROWS if r["concurrency"] in HELD_OUT])
    _, logo = calibration.leave_one_k_out()
    logo = [r for r in logo if int(r.what.split("c=")[1]) in HELD_OUT]
    for name, rows in (("committed", committed), ("leave-one-k-out", logo)):
        table = _table(rows)
        assert len(rows) == 30
        worst = max(rows, key=lambda r: abs(r.error))
        assert abs(worst.error) <= 0.10, f"{name} {worst.what}: {worst.error:+.1%}\n{table}"
        for c, group in calibration.by_concurrency(rows).items():
            median = statistics.median(r.error for r in group)
            assert abs(median) <= 0.06, f"{name} concurrency {c}: median {median:+.1%}\n{table}"


def test_concurrency_64_kv_cache_full_overpredicts_within_a_quarter():
    """The runs with a draft queued requests on a full KV cache at 64 (kvCacheAtConcurrency64); the model runs all
    64 at once, so it overpredicts: measured 14-20% (the speculation.yaml minSpeedup comment relies on 'within a
    quarter')."""
    rows = calibration.comparisons([r for r in calibration.ROWS if r["concurrency"] == calibration.KV_FULL_CONCURRENCY])
    table = _table(rows)
    assert len(rows) == 6
    assert all(0 < r.error <= 0.25 for r in rows), table


def test_speedup_falls_with_concurrency_for_every_k():
    """Predicted at each run's acceptance, and at the k's concurrency-1 acceptance held fixed: the gain of every
    draft length shrinks as concurrency rises. So does the measured gain, but for run-to-run noise of under 1%
    (k=3: 2.433x at concurrency 4, 2.440x at 8)."""
    for k in KS:
        fixed = calibration.alpha(_row(k, 1))
        measured = [_row(k, c)["measuredSpeedup"] for c in CONCURRENCIES]
        predicted = [calibration.estimate_row(_row(k, c)).speedup for c in CONCURRENCIES]
        held = [calibration.estimate_row(_row(k, c), fixed).speedup for c in CONCURRENCIES]
        for series in (predicted, held):
            assert all(a > b for a, b in pairwise(series)), (k, series)
        assert all(b < a * 1.01 for a, b in pairwise(measured)), (k, measured)


def test_past_saturation_a_longer_draft_is_slower():
    """At concurrency 1 an 8-token draft beats a 5-token one (measured 3.55x against 3.25x); at 64 the order flips
    (1.20x against 1.32x), and the model predicts both. With one acceptance for every k (the concurrency-1 runs'
    mean), the length the planner would pick (fastest of 1..8) never grows with concurrency: 8 at concurrency 1,
    at most 5 at 64 (measured fastest: k=8 at 1..8, 7 at 16, 5 at 32 and 64)."""
    low, high = 1, calibration.KV_FULL_CONCURRENCY
    measured = {(k, c): _row(k, c)["measuredSpeedup"] for k in (5, 8) for c in (low, high)}
    predicted = {(k, c): calibration.estimate_row(_row(k, c)).speedup for k in (5, 8) for c in (low, high)}
    for name, speed in (("measured", measured), ("predicted", predicted)):
        assert speed[8, low] > speed[5, low], (name, speed)
        assert speed[5, high] > speed[8, high], (name, speed)
    alpha = statistics.mean(calibration.alpha(r) for r in calibration.fit_rows())
    picked = []
    for c in CONCURRENCIES:
        row = _row(3, c)  # the workload of concurrency c (the k and alpha are given)
        speeds = {k: calibration.estimate_row(row, alpha, k).speedup for k in range(1, 9)}
        picked.append(max(speeds, key=speeds.get))
    assert picked[0] == 8 and picked[-1] <= 5, picked
    assert all(a >= b for a, b in pairwise(picked)), picked
