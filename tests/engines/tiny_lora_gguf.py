"""Tiny LoRA adapters, in llama.cpp's adapter GGUF format, for the tiny base model of tiny_gguf.py.

What llama.cpp's loader wants (src/llama-adapter.cpp, b11434): `general.type` "adapter" and
`general.architecture` the base model's ("llama"), `adapter.type` "lora", `adapter.lora.alpha`
(:198-219); for each adapted base tensor W (ggml shape ne = [in, out]) a pair `<W>.lora_a` of
ne [in, rank] and `<W>.lora_b` of ne [rank, out] (:357-372; numpy shapes (rank, in) and (out, rank)),
nothing else but `*_norm.weight` (:268-297). convert_lora_to_gguf.py writes the same keys.

Each adapter here is rank 8 over attn_q, attn_v and ffn_up of both layers, F32, with B nonzero (a PEFT
adapter fresh from initialisation has B = 0 and changes nothing) and large enough next to the base's
0.02-scaled random weights that applying it changes what the model generates. `wrong-shape` is the same
but its attn_q B has one row too many: the loader refuses it ("has incorrect shape").

Cheap to write, but cached like the base model (same directory, name keyed by a hash of the inputs), so
the server opens the same file on every run.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tiny_gguf import PARAMS as BASE
from tiny_gguf import cache_root

#: Bump when the generator changes in a way ADAPTERS do not show.
GENERATOR_VERSION = 1

RANK = 8
ALPHA = 16.0
TARGETS = ("attn_q", "attn_v", "ffn_up")

#: name -> (seed, standard deviation of A and B, rows to add to attn_q's B: nonzero makes a wrong shape)
ADAPTERS: dict[str, tuple[int, float, int]] = {
    "support": (11, 0.5, 0),
    "sql": (22, 0.5, 0),
    "wrong-shape": (33, 0.5, 1),
}


def _out_features(target: str) -> int:
    if target == "attn_q":
        return BASE["head_count"] * BASE["head_size"]
    if target in ("attn_k", "attn_v"):
        return BASE["head_count_kv"] * BASE["head_size"]
    if target in ("ffn_up", "ffn_gate"):
        return BASE["feed_forward_length"]
    raise ValueError(target)


def cache_key(name: str) -> str:
    material = json.dumps({"generator": GENERATOR_VERSION, "base": BASE, "rank": RANK, "alpha": ALPHA,
                           "targets": TARGETS, "adapter": ADAPTERS[name]}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def tiny_lora_gguf(name: str, directory: Path | None = None) -> Path:
    """The cached adapter `name` (a key of ADAPTERS), written first when missing; safe against concurrent
    writers (a temporary file renamed into place)."""
    directory = directory or cache_root()
    target = directory / f"tiny-lora-{name}-{cache_key(name)}.gguf"
    if target.is_file() and target.stat().st_size > 0:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        _write(name, partial)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _write(name: str, out: Path) -> None:
    import gguf
    import numpy as np

    seed, std, extra_rows = ADAPTERS[name]
    rng = np.random.default_rng(seed)
    d = BASE["embedding_length"]

    writer = gguf.GGUFWriter(str(out), "llama")  # general.architecture: the base's
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(f"tiny-lora-{name}")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, ALPHA)
    for i in range(BASE["block_count"]):
        for t in TARGETS:
            out_features = _out_features(t) + (extra_rows if t == "attn_q" else 0)
            a = (rng.standard_normal((RANK, d)) * std).astype(np.float32)
            b = (rng.standard_normal((out_features, RANK)) * std).astype(np.float32)
            writer.add_tensor(f"blk.{i}.{t}.weight.lora_a", a)
            writer.add_tensor(f"blk.{i}.{t}.weight.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
