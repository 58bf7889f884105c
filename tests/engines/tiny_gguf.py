"""A tiny random-weight Llama-architecture GGUF that a real llama-server loads and serves.

The tokenizer is Llama 3's (128,256 tokens, 280,147 BPE merges, the `llama-bpe` pre-tokenizer): its
keys and arrays are copied from `ggml-vocab-llama-bpe.gguf`, which ships in the same llama.cpp tree as
the binary. The network is 2 layers, embedding 64, 2 query heads and 1 KV head of size 32 (grouped-query
attention like the real models; a KV row of 32 elements is one q8_0 block, so `--cache-type-k/-v q8_0`
works), SwiGLU FFN 128, tied output embedding, F16 matrices (the variant the planner picks on CPU is f16).
Its trained context is that of Llama 3.2 (131,072), so the context sizes the operator renders are taken
as they are rather than capped.

Writing it reads ~400k strings and takes tens of seconds, so the file is cached outside the clone (next
to the llama-server build) under a name keyed by a hash of everything that goes into it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

#: Bump when the generator changes in a way PARAMS do not show.
GENERATOR_VERSION = 2

PARAMS = {
    "block_count": 2,
    "embedding_length": 64,
    "head_count": 2,
    "head_count_kv": 1,
    "head_size": 32,
    "feed_forward_length": 128,
    "context_length": 131072,
    "rope_freq_base": 500000.0,
    "rms_eps": 1e-5,
    "seed": 1234,
    "init_std": 0.02,
}

#: Llama 3's chat format (the vocab file carries no template). llama.cpp recognises it by its markers.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
EOT_TOKEN_ID = 128009  # <|eot_id|>


def cache_root() -> Path:
    """The cache scripts/build_llama_server.sh uses (same variables, same default)."""
    if os.environ.get("LLAMA_OPERATOR_CACHE"):
        return Path(os.environ["LLAMA_OPERATOR_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "llama-operator"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(vocab: Path) -> str:
    material = json.dumps({"generator": GENERATOR_VERSION, "params": PARAMS, "template": CHAT_TEMPLATE,
                           "vocab_sha256": _sha256(vocab)}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def tiny_llama_gguf(vocab: Path, directory: Path | None = None) -> Path:
    """The cached tiny model for `vocab`, written first when missing. Safe against concurrent writers
    (each writes its own temporary file and renames it into place)."""
    directory = directory or cache_root()
    target = directory / f"tiny-llama-{cache_key(vocab)}.gguf"
    if target.is_file() and target.stat().st_size > 0:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        _write(vocab, partial)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _write(vocab: Path, out: Path) -> None:
    import gguf
    import numpy as np

    p = PARAMS
    reader = gguf.GGUFReader(str(vocab))
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tiny-llama-random")
    writer.add_context_length(p["context_length"])
    writer.add_embedding_length(p["embedding_length"])
    writer.add_block_count(p["block_count"])
    writer.add_feed_forward_length(p["feed_forward_length"])
    writer.add_head_count(p["head_count"])
    writer.add_head_count_kv(p["head_count_kv"])
    writer.add_rope_dimension_count(p["head_size"])
    writer.add_rope_freq_base(p["rope_freq_base"])
    writer.add_layer_norm_rms_eps(p["rms_eps"])
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    # The tokenizer, copied key by key with the vocab file's own types.
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, field.types[0])
    if "tokenizer.chat_template" not in reader.fields:
        writer.add_chat_template(CHAT_TEMPLATE)
    if "tokenizer.ggml.eot_token_id" not in reader.fields:
        writer.add_eot_token_id(EOT_TOKEN_ID)

    rng = np.random.default_rng(p["seed"])
    d, ff = p["embedding_length"], p["feed_forward_length"]
    q_dim, kv_dim = p["head_count"] * p["head_size"], p["head_count_kv"] * p["head_size"]

    def matrix(rows: int, cols: int) -> "np.ndarray":  # numpy order: (out features, in features)
        return (rng.standard_normal((rows, cols)) * p["init_std"]).astype(np.float16)

    def norm() -> "np.ndarray":
        return np.ones(d, dtype=np.float32)

    writer.add_tensor("token_embd.weight", matrix(n_vocab, d))  # also the output layer (tied)
    writer.add_tensor("output_norm.weight", norm())
    for i in range(p["block_count"]):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.attn_q.weight", matrix(q_dim, d))
        writer.add_tensor(f"blk.{i}.attn_k.weight", matrix(kv_dim, d))
        writer.add_tensor(f"blk.{i}.attn_v.weight", matrix(kv_dim, d))
        writer.add_tensor(f"blk.{i}.attn_output.weight", matrix(d, q_dim))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(ff, d))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", matrix(ff, d))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", matrix(d, ff))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
