"""The estimator against published measurements: the rows in llama-facts-used.json (weights, decode),
decode-rows.json (llama.cpp decode), prefill-rows.json (llama.cpp prefill) and vllm-ttft-rows.json (vLLM TTFT),
predicted; and prefill-facts-used.json (other builds, CPU nodes, vLLM on an A10G), outside the fit.

Shared by benchmarks/calibrate_estimator.py (which fits the decode and prefill constants and prints them),
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
from llama_operator import prefill
from llama_operator.catalog import GPU, load_catalog

HERE = Path(__file__).resolve().parent
FACTS = json.loads((HERE / "llama-facts-used.json").read_text())["rows"]
EXTRA = json.loads((HERE / "extra-gpus.json").read_text())
PREFILL = json.loads((HERE / "prefill-rows.json").read_text())["rows"]
DECODE = json.loads((HERE / "decode-rows.json").read_text())["rows"]
VLLM_TTFT = json.loads((HERE / "vllm-ttft-rows.json").read_text())

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


def _decode_workload(row) -> est.Workload:
    """A tgN run averages over N tokens generated from an empty context (or from its depth): mean context N/2."""
    depth, generated = _decode_context(row)
    mean_context = depth + generated // 2
    return est.Workload(
        context_length=max(mean_context + 1, 1),
        concurrency=1,
        prompt_tokens=max(mean_context - est.REFERENCE_OUTPUT_TOKENS // 2, 0),
    )


def _decode_gpu(hardware: str) -> GPU:
    return load_catalog().find_gpu(hardware) or gpu_for(hardware)


def decode_comparisons(rows=None) -> list[Comparison]:
    """llama.cpp batch-1 decode through estimate(): llama-facts-used.json's rows (several builds), or `rows`
    (decode-rows.json's, whose `gpus` > 1 are layer splits)."""
    catalog = load_catalog()
    out = []
    if rows is None:
        rows = [r for r in FACTS
                if r["section"] == "C" and ("decode" in r["metric"] or "single-token" in r["metric"])]
    for row in rows:
        model = catalog.model(model_id(row["model"]))
        quant = catalog.quantizations[quant_id(row["variant"])]
        n = row.get("gpus", 1)
        e = est.estimate(model, quant, est.Hardware(gpu=_decode_gpu(row["hardware"]), gpu_count=n),
                         _decode_workload(row))
        hardware = row["hardware"] if n == 1 else f"{n}x {row['hardware']}"
        out.append(Comparison(f"decode {_decode_test(row)}", model.id, quant.id, hardware, float(row["value"]),
                              e.decode_tokens_per_second, row["source"]))
    return out


def _decode_test(row) -> str:
    test = re.search(r"tg\d+|\d+k depth", row["metric"])
    return test.group(0) if test else "tokens/s"


def every_decode_comparisons() -> list[Comparison]:
    """Every llama.cpp decode row of the calibration set: llama-facts-used.json's and decode-rows.json's."""
    return decode_comparisons() + decode_comparisons(DECODE)


# --- llama.cpp decode fit: t = (weights + KV) / min(eta x bandwidth, cap_k) + tau x layers ----------------------

#: The decode constants are fitted on the single-GPU tg512 rows; other lengths and layer splits are held out.
LLAMACPP_DECODE_FIT_TEST = "tg512"
DECODE_CAP_GRID = range(900, 2101, 50)  # GB/s
DECODE_TAU_GRID = [i * 5e-6 for i in range(0, 31)]  # seconds per layer


def decode_fit_rows(rows=None) -> list:
    return [r for r in (DECODE if rows is None else rows)
            if r.get("gpus", 1) == 1 and _decode_test(r) == LLAMACPP_DECODE_FIT_TEST]


def _decode_features(row) -> tuple[bool, float, float, int]:
    """(16-bit, bytes one step reads, eta x peak bandwidth in GB/s, layers) of a decode row."""
    catalog = load_catalog()
    model = catalog.model(model_id(row["model"]))
    quant = catalog.quantizations[quant_id(row["variant"])]
    gpu = _decode_gpu(row["hardware"])
    sixteen = quant.bits >= 16
    eta = est.DECODE_BANDWIDTH_EFFICIENCY_16BIT if sixteen else est.DECODE_BANDWIDTH_EFFICIENCY_QUANTIZED
    step = est.weights_bytes(model, quant) + est.kv_read_bytes_per_step(model.arch, _decode_workload(row))
    return sixteen, step, eta * gpu.memory_bandwidth_gbps, model.arch.layers


def _decode_predict(cap_gbps: float, tau: float, features) -> float:
    _, step, bandwidth, layers = features
    return 1.0 / (step / (min(bandwidth, cap_gbps) * 1e9) + tau * layers)


def fit_llamacpp_decode(rows) -> tuple[float, float, float]:
    """(cap 16-bit GB/s, cap quantized GB/s, tau s/layer): the grid point of least squared relative error on
    `rows`' single-GPU tg512 rows (each cap only touches its own rows, so they are searched apart per tau)."""
    feats = [(_decode_features(r), float(r["value"])) for r in decode_fit_rows(rows)]
    best = None
    for tau in DECODE_TAU_GRID:
        total, caps = 0.0, []
        for sixteen in (True, False):
            group = [(f, v) for f, v in feats if f[0] == sixteen]
            score, cap = min((sum(((_decode_predict(c, tau, f) - v) / v) ** 2 for f, v in group), c)
                             for c in DECODE_CAP_GRID)
            total += score
            caps.append(cap if group else None)
        if best is None or total < best[0] - 1e-12:
            best = (total, (caps[0], caps[1], tau))
    return best[1]


def decode_leave_one_gpu_out() -> list[Comparison]:
    """Each GPU's single-GPU rows (all lengths) predicted by the constants refitted without that GPU."""
    out = []
    single = [r for r in DECODE if r.get("gpus", 1) == 1]
    for gpu in sorted({r["hardware"] for r in single}):
        cap16, capq, tau = fit_llamacpp_decode([r for r in single if r["hardware"] != gpu])
        for row in single:
            if row["hardware"] == gpu:
                f = _decode_features(row)
                out.append(Comparison(f"decode {_decode_test(row)} LOGO", model_id(row["model"]),
                                      quant_id(row["variant"]), gpu, float(row["value"]),
                                      _decode_predict(cap16 if f[0] else capq, tau, f), row["source"]))
    return out


def _prompt(row) -> int:
    return int(re.search(r"pp(\d+)", row["metric"]).group(1))


def _gpu(product: str) -> GPU:
    gpu = load_catalog().find_gpu(product)
    assert gpu is not None, product
    return gpu


def prefill_comparisons(rows=None) -> list[Comparison]:
    """llama.cpp prompt processing (llama-bench ppN from an empty cache) through estimate()."""
    catalog = load_catalog()
    out = []
    for row in PREFILL if rows is None else rows:
        model = catalog.model(model_id(row["model"]))
        quant = catalog.quantizations[quant_id(row["variant"])]
        n = _prompt(row)
        workload = est.Workload(context_length=n + 1, concurrency=1, prompt_tokens=n)
        e = est.estimate(model, quant, est.Hardware(gpu=_gpu(row["hardware"])), workload)
        out.append(Comparison(f"prefill pp{n}", model.id, quant.id, row["hardware"], float(row["value"]),
                              e.prefill_tokens_per_second, row["source"]))
    return out


# --- Fitting (benchmarks/calibrate_estimator.py prints it; the docs show leave-one-GPU-out) -------------------


def _lstsq_relative(xs: list[list[float]], ys: list[float]) -> list[float]:
    """Minimise sum(((x.c - y) / y)^2) by the normal equations (Gaussian elimination, partial pivoting)."""
    k = len(xs[0])
    a = [[0.0] * k for _ in range(k)]
    b = [0.0] * k
    for x, y in zip(xs, ys):
        w = 1.0 / (y * y)
        for i in range(k):
            b[i] += w * x[i] * y
            for j in range(k):
                a[i][j] += w * x[i] * x[j]
    for c in range(k):
        p = max(range(c, k), key=lambda r: abs(a[r][c]))
        a[c], a[p], b[c], b[p] = a[p], a[c], b[p], b[c]
        for r in range(k):
            if r != c:
                f = a[r][c] / a[c][c]
                for j in range(c, k):
                    a[r][j] -= f * a[c][j]
                b[r] -= f * b[c]
    return [b[i] / a[i][i] for i in range(k)]


def nonnegative_fit(xs: list[list[float]], ys: list[float]) -> list[float]:
    """Relative least squares, dropping any coefficient that comes out negative (no physical meaning) and
    any whose column is all zero (nothing to fit it on: returned as None)."""
    active = [i for i in range(len(xs[0])) if any(x[i] for x in xs)]
    while True:
        coef = _lstsq_relative([[x[i] for i in active] for x in xs], ys)
        if all(c >= 0 for c in coef):
            out: list = [None] * len(xs[0])
            for i, c in zip(active, coef):
                out[i] = c
            for i in range(len(out)):
                if out[i] is None and any(x[i] for x in xs):
                    out[i] = 0.0
            return out
        active.pop(min(range(len(coef)), key=lambda i: coef[i]))


#: llama.cpp prefill, seconds = x . c with c = (1/eff 16-bit, 1/eff quantized, weight passes, KQ passes)
LLAMACPP_PREFILL_FIT_ROWS = (512, 4096)  # fitted prompt lengths; pp1024 and pp8192 are held out


def _llamacpp_features(row) -> list[float]:
    catalog = load_catalog()
    model = catalog.model(model_id(row["model"]))
    quant = catalog.quantizations[quant_id(row["variant"])]
    p = est.parameter_counts(model.arch)
    t = prefill.llamacpp_prefill_terms(model.arch, _prompt(row), est.weights_bytes(model, quant), p.active_per_token,
                                   _gpu(row["hardware"]))
    sixteen = quant.bits >= 16
    return [t.matmul_at_peak if sixteen else 0.0, 0.0 if sixteen else t.matmul_at_peak, t.weight_pass, t.kq_pass]


def fit_llamacpp_prefill(rows) -> list[float]:
    """(1/efficiency 16-bit, 1/efficiency quantized, weight passes, KQ passes) fitted on `rows`' fit lengths."""
    fit = [r for r in rows if _prompt(r) in LLAMACPP_PREFILL_FIT_ROWS]
    return nonnegative_fit([_llamacpp_features(r) for r in fit], [_prompt(r) / float(r["value"]) for r in fit])


def _llamacpp_predict(coef, row) -> float:
    x = _llamacpp_features(row)
    # a kernel absent from the fit (no 16-bit row) falls back to the other's efficiency
    c = [coef[0] if coef[0] is not None else coef[1], coef[1] if coef[1] is not None else coef[0], *coef[2:]]
    return _prompt(row) / sum(a * b for a, b in zip(c, x))


def prefill_leave_one_gpu_out() -> list[Comparison]:
    """Each GPU predicted by the constants refitted on the other GPUs' pp512 + pp4096 rows (all its rows)."""
    out = []
    for gpu in sorted({r["hardware"] for r in PREFILL}):
        coef = fit_llamacpp_prefill([r for r in PREFILL if r["hardware"] != gpu])
        for row in PREFILL:
            if row["hardware"] == gpu:
                out.append(Comparison(f"prefill pp{_prompt(row)} LOGO", model_id(row["model"]),
                                      quant_id(row["variant"]), gpu, float(row["value"]), _llamacpp_predict(coef, row),
                                      row["source"]))
    return out


# --- vLLM TTFT ------------------------------------------------------------------------------------------------


def _vllm_parts(row):
    catalog = load_catalog()
    model = catalog.model(model_id(row["model"]))
    quant = catalog.quantizations[row["variant"]]
    n, _, product = row["hardware"].partition("x ")
    return model, quant, _gpu(product), int(n)


def vllm_ttft_comparisons(rows=None) -> list[Comparison]:
    """LambdaLabs bursts of 10 prompts (1369 tokens) through estimate(): the concurrency-10 batch at the mean
    prompt (137 tokens; the attention term then differs from the measured mix by a negligible amount)."""
    out = []
    lens = VLLM_TTFT["inputLens"]
    for row in VLLM_TTFT["rows"] if rows is None else rows:
        model, quant, gpu, n = _vllm_parts(row)
        workload = est.Workload(context_length=2048, concurrency=len(lens), prompt_tokens=round(sum(lens) / len(lens)))
        e = est.estimate(model, quant, est.Hardware(gpu=gpu, gpu_count=n), workload)
        out.append(Comparison("vLLM TTFT (ms)", model.id, quant.id, row["hardware"], float(row["value"]),
                              e.ttft_seconds * 1e3, row["source"]))
    return out


VLLM_KERNELS = ("bf16", "fp8-w8a8", "marlin")


def _vllm_features(row) -> tuple[list[float], float]:
    """([1, compute at peak in the row's kernel column], fixed seconds) of the measured prompt mix."""
    model, quant, gpu, n = _vllm_parts(row)
    p = est.parameter_counts(model.arch)
    allreduce = 2 * model.arch.layers * est.ALLREDUCE_LATENCY_SECONDS.get(gpu.interconnect, 25e-6) if n > 1 else 0.0
    t = prefill.vllm_prefill_terms(model.arch, quant, VLLM_TTFT["inputLens"], est.weights_bytes(model, quant),
                                   p.active_per_token, gpu, n, allreduce)
    return [1.0] + [t.compute_at_peak if t.kernel == k else 0.0 for k in VLLM_KERNELS], t.fixed


def fit_vllm_ttft(rows) -> list:
    """(T0 seconds, 1/eff bf16, 1/eff FP8 W8A8, 1/eff Marlin); a kernel no row has is None."""
    xs, ys = [], []
    for row in rows:
        x, fixed = _vllm_features(row)
        xs.append(x)
        ys.append(float(row["value"]) / 1e3 - fixed)
    return nonnegative_fit(xs, ys)


def _vllm_predict(coef, row) -> float:
    x, fixed = _vllm_features(row)
    c = [v if v is not None else coef[1] for v in coef]  # an unseen kernel: bf16's efficiency on its peak
    return (sum(a * b for a, b in zip(c, x)) + fixed) * 1e3


def vllm_leave_one_out(key) -> list[Comparison]:
    """Each group of rows (by `key`) predicted by the constants refitted on the other rows."""
    rows = VLLM_TTFT["rows"]
    out = []
    for group in sorted({key(r) for r in rows}):
        coef = fit_vllm_ttft([r for r in rows if key(r) != group])
        for row in rows:
            if key(row) == group:
                model, quant, _, _ = _vllm_parts(row)
                out.append(Comparison("vLLM TTFT (ms) held out", model.id, quant.id, row["hardware"],
                                      float(row["value"]), _vllm_predict(coef, row), row["source"]))
    return out


def vllm_leave_one_gpu_out() -> list[Comparison]:
    return vllm_leave_one_out(lambda r: r["hardware"].partition("x ")[2])


def vllm_leave_one_row_out() -> list[Comparison]:
    return vllm_leave_one_out(lambda r: (r["hardware"], r["model"], r["variant"]))


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
    every = every_decode_comparisons()
    single = [r for r in DECODE if r.get("gpus", 1) == 1]
    decode_groups = {
        "decode-rows.json, single GPU, tg512 (fit)": decode_comparisons(decode_fit_rows()),
        "decode-rows.json, single GPU, tg1024-tg8192 (held out)":
            decode_comparisons([r for r in single if r not in decode_fit_rows()]),
        "decode-rows.json, single GPU, 70B": decode_comparisons([r for r in single if "70B" in r["model"]]),
        "decode-rows.json, layer split over 2-8 GPUs (held out)":
            decode_comparisons([r for r in DECODE if r.get("gpus", 1) > 1]),
        "llama-facts-used.json, other builds (held out)": decode,
        "every decode row": every,
    }
    decode_logo = decode_leave_one_gpu_out()
    prefill = prefill_comparisons()
    held = [r for r in prefill if int(r.what.removeprefix("prefill pp")) not in LLAMACPP_PREFILL_FIT_ROWS]
    logo = prefill_leave_one_gpu_out()
    vllm = vllm_ttft_comparisons()
    vllm_loro = vllm_leave_one_row_out()
    vllm_logo = vllm_leave_one_gpu_out()
    return "\n".join([
        GENERATED_BEGIN,
        "",
        f"**Weight sizes**: median absolute error {median_abs_error(weights):.2%}, "
        f"largest {max(abs(r.error) for r in weights):.2%} over {len(weights)} published files and vLLM logs.",
        "",
        markdown_table(weights, "GB"),
        "",
        (f"**llama.cpp decode speed** (tokens/s, batch 1), every decode row: {summary(every)}. Fitted on the "
         f"single-GPU tg512 rows of decode-rows.json; the other rows are held out."),
        "",
        "| rows | n | median | largest |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {len(rs)} | {median_abs_error(rs):.1%} | {max(abs(r.error) for r in rs):.1%} |"
          for name, rs in decode_groups.items()],
        "",
        (f"**llama.cpp decode, leave one GPU out** (each GPU's single-GPU rows predicted by the constants "
         f"refitted without it): {summary(decode_logo)}."),
        "",
        "| GPU | rows | median | largest |",
        "|---|---:|---:|---:|",
        *[f"| {g} | {len(rs)} | {median_abs_error(rs):.1%} | {max(abs(r.error) for r in rs):.1%} |"
          for g, rs in by_gpu(decode_logo).items()],
        "",
        "Single-GPU tg512 rows (the fit):",
        "",
        markdown_table(decode_comparisons(decode_fit_rows()), "tokens/s"),
        "",
        "llama-facts-used.json's decode rows (other builds and sources, held out):",
        "",
        markdown_table(decode, "tokens/s"),
        "",
        (f"**llama.cpp prefill speed** (tokens/s, llama-bench ppN, one GPU): {summary(prefill)}; "
         f"fitted on the pp512 and pp4096 rows, pp1024 and pp8192 held out ({summary(held)})."),
        "",
        markdown_table(prefill, "tokens/s"),
        "",
        (f"**llama.cpp prefill, leave one GPU out** (each GPU predicted by the constants refitted without it): "
         f"{summary(logo)}."),
        "",
        "| GPU | rows | median | largest |",
        "|---|---:|---:|---:|",
        *[f"| {g} | {len(rs)} | {median_abs_error(rs):.1%} | {max(abs(r.error) for r in rs):.1%} |"
          for g, rs in by_gpu(logo).items()],
        "",
        (f"**vLLM TTFT** (ms, bursts of 10 prompts, 1369 tokens, prefilled together): {summary(vllm)}; "
         f"leave one row out: {summary(vllm_loro)}; leave one GPU out: {summary(vllm_logo)}."),
        "",
        markdown_table(vllm, "ms"),
        "",
        *facts_section(),
        *outside_the_fit_section(),
        GENERATED_END,
    ])


def summary(rows: list[Comparison]) -> str:
    return (f"median absolute error {median_abs_error(rows):.1%}, largest {max(abs(r.error) for r in rows):.1%} "
            f"over {len(rows)} rows")


def by_gpu(rows: list[Comparison]) -> dict[str, list[Comparison]]:
    out: dict[str, list[Comparison]] = {}
    for r in rows:
        out.setdefault(r.hardware, []).append(r)
    return out


# --- Outside the fit: prefill-facts.json's rows (nothing is fitted on them) -----------------------------------

FACTS_USED = json.loads((HERE / "prefill-facts-used.json").read_text())


def facts_threads(row) -> int:
    found = re.search(r"(\d+) threads|-t (\d+)", row["conditions"])
    assert found, row["conditions"]
    return int(found.group(1) or found.group(2))


def facts_hardware(row) -> est.Hardware:
    """A catalog or extra-gpus.json GPU, or a CPU node of the threads the run used (at most the node's cores)
    and the node's peak bandwidth."""
    spec = FACTS_USED["hardware"][row["hardware"]]
    if "gpu" in spec:
        return est.Hardware(gpu=_decode_gpu(spec["gpu"]))
    cores = min(facts_threads(row), spec["cpuCores"])
    return est.Hardware(gpu=None, cpu_cores=cores, cpu_bandwidth_gbps=spec["bandwidthGBps"])


def _facts_label(row, hw: est.Hardware) -> str:
    return hw.describe().replace("cpu", row["hardware"].split(" (")[0].split(",")[0], 1) if hw.is_cpu \
        else row["hardware"]


def facts_decode_test(row) -> str:
    """tg128 unless the run says otherwise (the AWS rows generate 256 tokens)."""
    generated = re.search(r"\((\d+) tokens", row["conditions"])
    return f"tg{generated.group(1)}" if generated else _decode_test(row)


def _facts_llamacpp(row) -> Comparison:
    catalog = load_catalog()
    model = catalog.model(model_id(row["model"]))
    quant = catalog.quantizations[quant_id(row["variant"])]
    hw = facts_hardware(row)
    if "decode" in row["metric"]:
        test = facts_decode_test(row)
        e = est.estimate(model, quant, hw, _decode_workload({**row, "metric": test}))
        return Comparison(f"decode {test}", model.id, quant.id, _facts_label(row, hw), float(row["value"]),
                          e.decode_tokens_per_second, row["source"])
    n = _prompt(row)
    e = est.estimate(model, quant, hw, est.Workload(context_length=n + 1, concurrency=1, prompt_tokens=n))
    return Comparison(f"prefill pp{n}", model.id, quant.id, _facts_label(row, hw), float(row["value"]),
                      e.prefill_tokens_per_second, row["source"])


def _facts_vllm_ttft(row) -> Comparison:
    """llmperf on localhost: ~550-token prompts (~150 out) at a fixed concurrency, as the planned burst."""
    catalog = load_catalog()
    model = catalog.model(model_id(row["model"]))
    quant = catalog.quantizations["bf16"]  # fp16: the same bytes and tensor peak
    prompt, output = (int(x) for x in re.search(r"~(\d+) input / ~(\d+) output", row["conditions"]).groups())
    c = int(re.search(r"concurrency (\d+)", row["conditions"]).group(1))
    hw = facts_hardware(row)
    e = est.estimate(model, quant, hw, est.Workload(context_length=prompt + output, concurrency=c, prompt_tokens=prompt))
    return Comparison(f"vLLM TTFT (ms) c={c}", model.id, quant.id, row["hardware"], float(row["value"]),
                      e.ttft_seconds * 1e3, row["source"])


def facts_groups() -> dict[str, list[Comparison]]:
    """prefill-facts-used.json's rows by group: llama.cpp GPU prefill / decode and vLLM TTFT (outside every fit);
    llama.cpp CPU prefill / decode, which the CPU constants are fitted on (calibration/cpu.py): each machine
    predicted by the constants refitted without it, and every row by estimate() as committed."""
    from calibration import cpu  # it builds on this module

    rows = FACTS_USED["rows"]
    gpu = [r for r in rows if "gpu" in FACTS_USED["hardware"][r["hardware"]] and r["metric"] != "TTFT"]
    cpu_rows = [r for r in rows if "cpuCores" in FACTS_USED["hardware"][r["hardware"]]]
    cpu_logo = cpu.leave_one_machine_out(cpu.ROWS)
    return {
        "(a) llama.cpp GPU prefill": [_facts_llamacpp(r) for r in gpu if "decode" not in r["metric"]],
        "(b) llama.cpp GPU decode": [_facts_llamacpp(r) for r in gpu if "decode" in r["metric"]],
        "(c) llama.cpp CPU prefill, leave one machine out": [c for c in cpu_logo if c.what.startswith("prefill")],
        "(c) llama.cpp CPU decode, leave one machine out": [c for c in cpu_logo if c.what.startswith("decode")],
        "(c) llama.cpp CPU prefill, the fit (estimate() as committed)":
            [_facts_llamacpp(r) for r in cpu_rows if "decode" not in r["metric"]],
        "(c) llama.cpp CPU decode, the fit (estimate() as committed)":
            [_facts_llamacpp(r) for r in cpu_rows if "decode" in r["metric"]],
        "(d) vLLM TTFT, localhost": [_facts_vllm_ttft(r) for r in rows if r["metric"] == "TTFT"],
    }


#: The issue's bounds (median absolute error) over every row outside its fit.
OUTSIDE_THE_FIT_BOUNDS = {"llama.cpp prefill": 0.30, "vLLM TTFT": 0.20, "llama.cpp decode": 0.10}


def outside_the_fit() -> dict[str, list[Comparison]]:
    """Every published row predicted by constants not fitted on it, pooled per quantity: llama.cpp prefill (the
    held-out prompt lengths, prefill-facts' GPU row, its CPU rows left out one machine at a time), vLLM TTFT
    (each row left out, and the A10G llmperf rows), llama.cpp decode (every decode row but the tg512 fit rows,
    prefill-facts' GPU rows, its CPU rows left out one machine at a time)."""
    groups = facts_groups()
    prefill = prefill_comparisons()
    fit = decode_comparisons(decode_fit_rows())
    return {
        "llama.cpp prefill": [r for r in prefill if int(r.what.removeprefix("prefill pp"))
                              not in LLAMACPP_PREFILL_FIT_ROWS]
        + groups["(a) llama.cpp GPU prefill"] + groups["(c) llama.cpp CPU prefill, leave one machine out"],
        "vLLM TTFT": vllm_leave_one_row_out() + groups["(d) vLLM TTFT, localhost"],
        "llama.cpp decode": [r for r in every_decode_comparisons() if r not in fit]
        + groups["(b) llama.cpp GPU decode"] + groups["(c) llama.cpp CPU decode, leave one machine out"],
    }


def outside_the_fit_section() -> list[str]:
    pooled = outside_the_fit()
    return [
        ("**Every row outside its fit, pooled** (the issue's bounds on the median; the groups above that miss "
         "them on their own are listed under \"Not reached\"):"),
        "",
        "| quantity | rows | median | bound | largest |",
        "|---|---:|---:|---:|---:|",
        *[f"| {name} | {len(rs)} | {median_abs_error(rs):.1%} | {OUTSIDE_THE_FIT_BOUNDS[name]:.0%} | "
          f"{max(abs(r.error) for r in rs):.1%} |" for name, rs in pooled.items()],
        "",
    ]


def facts_section() -> list[str]:
    """docs/estimator.md's tables of prefill-facts-used.json's groups."""
    groups = facts_groups()
    lines = [
        (f"**prefill-facts.json** ({len(FACTS_USED['rows'])} rows in "
         f"benchmarks/calibration/prefill-facts-used.json, the others left out there with the reason): the GPU "
         f"and vLLM rows are outside every fit; the CPU rows are the CPU constants' fit, shown left out one "
         f"machine at a time and as fitted."),
        "",
        "| group | rows | median | largest |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {len(rs)} | {median_abs_error(rs):.1%} | {max(abs(r.error) for r in rs):.1%} |"
          for name, rs in groups.items()],
        "",
    ]
    for name, rs in groups.items():
        unit = "ms" if "TTFT" in name else "tokens/s"
        lines += [f"{name}:", "", markdown_table(rs, unit), ""]
    return lines
