"""The estimator against published measurements (benchmarks/calibration/llama-facts-used.json).

Prints the error tables (pytest -s shows them; they are also in the failure message) and fails when the
median absolute error of weight sizes exceeds 5% or of decode speed exceeds 25%.
"""
from __future__ import annotations

from calibration import compare as calibration

from llama_operator import estimate as est
from llama_operator.catalog import load_catalog

from kit.paths import ROOT


def test_weight_sizes_match_published_files_and_vllm_logs():
    rows = calibration.weight_size_comparisons()
    table = calibration.table(rows)
    print("\n" + table)
    assert len(rows) >= 30, "the calibration set lost its weight-size rows"
    median = calibration.median_abs_error(rows)
    assert median <= 0.05, f"median |error| of weight sizes {median:.1%} > 5%\n{table}"
    # Every single file is also within 3%: a regression in one quantization's mix must not hide
    # behind a good median.
    worst = max(rows, key=lambda r: abs(r.error))
    assert abs(worst.error) <= 0.03, f"{worst.model} {worst.variant}: {worst.error:+.1%}\n{table}"


def test_decode_speed_matches_llama_bench_measurements():
    rows = calibration.decode_comparisons()
    table = calibration.table(rows)
    print("\n" + table)
    assert len(rows) >= 15
    median = calibration.median_abs_error(rows)
    assert median <= 0.25, f"median |error| of decode speed {median:.1%} > 25%\n{table}"


def test_prefill_speed_matches_llama_bench_measurement():
    rows = calibration.prefill_comparisons()
    print("\n" + calibration.table(rows))
    assert rows and all(abs(r.error) <= 0.25 for r in rows)


def test_parameter_counts_match_published_counts():
    for model in load_catalog().models.values():
        counted = est.parameter_counts(model.arch).total
        assert abs(counted / model.published_parameters - 1) < 0.01, (model.id, counted)


def test_vllm_memory_profile_of_llama3_8b_on_h100():
    """vLLM's own startup profile (calibration D): weights 14.96 GiB, non-torch 1.79 GiB, activations
    1.26 GiB at TP1; per GPU 7.48 GiB weights and 3.58 GiB non-torch at TP2."""
    catalog = load_catalog()
    model = catalog.model("llama-3.1-8b-instruct")
    bf16 = catalog.quantizations["bf16"]
    h100 = catalog.find_gpu("NVIDIA-H100-80GB-HBM3")
    workload = est.Workload(context_length=8192, concurrency=1, prompt_tokens=512)
    one = est.estimate(model, bf16, est.Hardware(gpu=h100, gpu_count=1), workload)
    two = est.estimate(model, bf16, est.Hardware(gpu=h100, gpu_count=2), workload)
    GiB = 2**30
    assert abs(one.weights_bytes / GiB - 14.96) < 0.05
    assert abs(one.overhead_bytes / GiB - (1.79 + 1.26)) < 0.01
    # Per GPU at TP2: half the weights and KV cache, and 3.58 GiB non-torch + 1.26 GiB activations.
    expected_per_gpu = (one.weights_bytes + one.kv_cache_bytes) / 2 + (3.58 + 1.26) * GiB
    assert abs(two.per_gpu_bytes - expected_per_gpu) / GiB < 0.01
    # The KV cache of 8192 tokens: 2 x 32 layers x 8 heads x 128 dims x 2 bytes = 128 KiB a token.
    assert one.kv_cache_bytes == 8192 * 131072


def test_docs_show_the_current_calibration_tables():
    """docs/estimator.md carries the error tables of the committed estimator (`make docs` refreshes them)."""
    doc = (ROOT / "docs" / "estimator.md").read_text()
    start = doc.index(calibration.GENERATED_BEGIN)
    end = doc.index(calibration.GENERATED_END) + len(calibration.GENERATED_END)
    assert doc[start:end] == calibration.generated_section(), "docs/estimator.md is stale: run `make docs`"


def test_docs_show_the_current_field_reference():
    """docs/operator.md carries the field reference of the committed CRD schema (`make docs`)."""
    from llama_operator import reference

    doc = (ROOT / "docs" / "operator.md").read_text()
    start = doc.index(reference.BEGIN)
    end = doc.index(reference.END) + len(reference.END)
    assert doc[start:end] == reference.field_reference(), "docs/operator.md is stale: run `make docs`"
