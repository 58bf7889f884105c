"""The estimator against published measurements: the rows in llama-facts-used.json, predicted.

Shared by benchmarks/calibrate_estimator.py (which fits the decode constants and prints the table),
tests/unit/test_estimator_calibration.py (which asserts the error bounds) and scripts/update_docs.py (which
writes the tables into docs/estimator.md).
"""
from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from llama_operator import estimate as est
from llama_operator.catalog import GPU, load_catalog

HERE = Path(__file__).resolve().parent
FACTS = json.loads((HERE / "llama-facts-used.json").read_text())["rows"]
EXTRA = json.loads((HERE / "extra-gpus.json").read_text())

MODEL_IDS = {
    "1B": "llama-3.2-1b-instruct",
    "3B": "llama-3.2-3b-instruct",
    "8B": "llama-3.1-8b-instruct",  # Llama 3 8B and 3.1 8B share every shape
    "70B": "llama-3.1-70b-instruct",
    "405B": "llama-3.1-405b-instruct",
    "11B": "llama-3.2-11b-vision-instruct",
    "90B": "llama-3.2-90b-vision-instruct",
}


@dataclass(frozen=True)
class Comparison:
    what: str
    model: str
    variant: str
    hardware: str
    measured: float
    predicted: float
    source: str

    @property
    def error(self) -> float:
        return (self.predicted - self.measured) / self.measured


def model_id(text: str) -> str:
    size = re.search(r"\b(\d+B)\b", text)
    assert size, text
    if "3.3" in text and size.group(1) == "70B":
        return "llama-3.3-70b-instruct"
    return MODEL_IDS[size.group(1)]


def quant_id(variant: str) -> str:
    token = variant.replace("GGUF", "").split("(")[0].strip().lower()
    return {"bf16": "f16"}.get(token, token)


def gpu_for(hardware: str) -> GPU:
    catalog = load_catalog()
    alias = EXTRA["catalogAliases"].get(hardware)
    if alias:
        gpu = catalog.find_gpu(alias)
        assert gpu is not None, alias
        return gpu
    spec = EXTRA["gpus"][hardware]
    # A consumer card outside the catalog: only its bandwidth matters for decode.
    template = catalog.find_gpu("NVIDIA-GeForce-RTX-4090")
    return replace(template, product=hardware, memory_bandwidth_gbps=spec["memoryBandwidthGBps"])


def _bytes(row) -> float:
    value = float(row["value"])
    unit = row["unit"]
    if unit == "bytes":
        return value
    if unit == "GB":
        return value * 1e9
    if unit == "MB":
        return value * 1e6
    if unit.startswith("GiB") or unit.startswith("GB (as labelled; values match GiB)") or unit == "GB (vLLM label)":
        return value * 2**30
    raise ValueError(unit)


def weight_size_comparisons() -> list[Comparison]:
    catalog = load_catalog()
    out = []
    for row in FACTS:
        if row["section"] == "B" and row["metric"] == "file_size" and row["variant"].startswith("GGUF"):
            unit = row["unit"]
            model = catalog.model(model_id(row["model"]))
            quant = catalog.quantizations[quant_id(row["variant"])]
            measured = _bytes(row)
            if "as labelled" in unit:
                # "model size as loaded" tables report tensor bytes only (no tokenizer metadata)
                predicted = est.weights_bytes(model, quant) - catalog.gguf_metadata_bytes
            else:
                predicted = est.weights_bytes(model, quant)
            out.append(Comparison("gguf file size", model.id, row["variant"], "-", measured, predicted, row["source"]))
        if row["section"] == "D" and row["metric"] in ("vLLM model weights", "vLLM 'Loading model weights took'"):
            model = catalog.model(model_id(row["model"]))
            measured = _bytes(row)
            predicted = est.weights_bytes(model, catalog.quantizations["bf16"])
            out.append(Comparison("vLLM weights", model.id, "bf16", row["hardware"], measured, predicted, row["source"]))
        if row["section"] == "D" and row["metric"] == "vLLM model weights per GPU":
            model = catalog.model(model_id(row["model"]))
            measured = _bytes(row)
            predicted = est.weights_bytes(model, catalog.quantizations["bf16"]) / 2
            out.append(Comparison("vLLM weights/GPU TP2", model.id, "bf16", row["hardware"], measured, predicted, row["source"]))
    return out


def _decode_context(row) -> tuple[int, int]:
    """(prompt tokens, generated tokens) of a llama.cpp measurement, from its metric text."""
    metric = row["metric"]
    depth = re.search(r"at (\d+)k depth", metric)
    if depth:
        return int(depth.group(1)) * 1024, 1
    tg = re.search(r"tg(\d+)", metric)
    return 0, int(tg.group(1)) if tg else 128


def decode_comparisons() -> list[Comparison]:
    catalog = load_catalog()
    out = []
    for row in FACTS:
        if row["section"] != "C" or not ("decode" in row["metric"] or "single-token" in row["metric"]):
            continue
        model = catalog.model(model_id(row["model"]))
        quant = catalog.quantizations[quant_id(row["variant"])]
        gpu = gpu_for(row["hardware"])
        depth, generated = _decode_context(row)
        # A tgN run averages over N tokens generated from an empty context: mean context N/2.
        mean_context = depth + generated // 2
        workload = est.Workload(
            context_length=max(mean_context + 1, 1),
            concurrency=1,
            prompt_tokens=max(mean_context - est.REFERENCE_OUTPUT_TOKENS // 2, 0),
        )
        e = est.estimate(model, quant, est.Hardware(gpu=gpu, gpu_count=1), workload)
        out.append(
            Comparison("decode tokens/s", model.id, quant.id, row["hardware"], float(row["value"]),
                       e.decode_tokens_per_second, row["source"])
        )
    return out


def prefill_comparisons() -> list[Comparison]:
    catalog = load_catalog()
    out = []
    for row in FACTS:
        if row["section"] == "C" and "prefill" in row["metric"]:
            model = catalog.model(model_id(row["model"]))
            quant = catalog.quantizations[quant_id(row["variant"])]
            gpu = gpu_for(row["hardware"])
            workload = est.Workload(context_length=1024, concurrency=1, prompt_tokens=512)
            e = est.estimate(model, quant, est.Hardware(gpu=gpu), workload)
            out.append(Comparison("prefill tokens/s", model.id, quant.id, row["hardware"], float(row["value"]),
                                  e.prefill_tokens_per_second, row["source"]))
    return out


def median_abs_error(rows: list[Comparison]) -> float:
    return statistics.median(abs(r.error) for r in rows)


def table(rows: list[Comparison]) -> str:
    lines = [f"{'what':<22} {'model':<24} {'variant':<22} {'hardware':<30} {'measured':>12} {'predicted':>12} {'error':>8}"]
    for r in rows:
        lines.append(
            f"{r.what:<22} {r.model:<24} {r.variant[:22]:<22} {r.hardware[:30]:<30} {r.measured:>12.4g} {r.predicted:>12.4g} {r.error:>+8.1%}"
        )
    return "\n".join(lines)


def markdown_table(rows: list[Comparison], unit: str) -> str:
    lines = [f"| what | model | variant | hardware | measured ({unit}) | predicted ({unit}) | error |",
             "|---|---|---|---|---:|---:|---:|"]
    scale = 1e9 if unit == "GB" else 1.0
    for r in rows:
        lines.append(f"| {r.what} | {r.model} | {r.variant} | {r.hardware} | {r.measured / scale:.4g} | "
                     f"{r.predicted / scale:.4g} | {r.error:+.1%} |")
    return "\n".join(lines)


GENERATED_BEGIN = "<!-- calibration tables: generated by `make docs` (scripts/update_docs.py); do not edit -->"
GENERATED_END = "<!-- end of generated calibration tables -->"


def generated_section() -> str:
    """The calibration tables in docs/estimator.md, recomputed from the committed estimator."""
    weights = weight_size_comparisons()
    decode = decode_comparisons()
    prefill = prefill_comparisons()
    return "\n".join([
        GENERATED_BEGIN,
        "",
        f"**Weight sizes**: median absolute error {median_abs_error(weights):.2%}, "
        f"largest {max(abs(r.error) for r in weights):.2%} over {len(weights)} published files and vLLM logs.",
        "",
        markdown_table(weights, "GB"),
        "",
        f"**Decode speed** (tokens/s, batch 1): median absolute error {median_abs_error(decode):.1%}, "
        f"largest {max(abs(r.error) for r in decode):.1%} over {len(decode)} llama.cpp measurements.",
        "",
        markdown_table(decode, "tokens/s"),
        "",
        "**Prefill speed** (tokens/s, 512-token prompt):",
        "",
        markdown_table(prefill, "tokens/s"),
        "",
        GENERATED_END,
    ])
