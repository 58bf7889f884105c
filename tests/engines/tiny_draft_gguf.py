"""Tiny draft models for speculative decoding, made from the tiny model of tiny_gguf.py.

llama.cpp b11434 takes a draft only when its vocabulary matches the target's (common/speculative.cpp:106-169,
common_speculative_are_compatible): the same vocabulary type, BOS and EOS, token counts at most
SPEC_VOCAB_MAX_SIZE_DIFFERENCE = 128 apart (:30, 140-152) and the same text for every token from id 5
(:31, 154-165). Each draft here is the tiny model's file with one change:

  one-layer   compatible: the tiny model's tokenizer, embedding (also its output layer), output norm and first
              block only (block_count 1). It proposes what the target's first layer predicts, so the target
              accepts most of its tokens, not all.
  extra-256   incompatible: the whole tiny model with 256 tokens added to its vocabulary (128,512 against
              128,256, twice the tolerance) and an embedding row for each. llama-server loads it, logs "the
              target and draft vocabs are not compatible" and serves without speculation
              (tools/server/server-context.cpp:1392-1413).

Written fast: straight from the tiny model's bytes rather than through gguf.GGUFReader, which spends about 14 s
parsing the 400k tokenizer strings. The key-value section is walked once and copied as it is but for the keys a
draft changes (general.name, llama.block_count, llama.vocab_size, the token list and the token types), then the
tensors kept are copied with their new offsets: under a second. Cached like the tiny model (same directory, a
name keyed by a hash of the inputs, the tiny model's name included since it carries that model's own hash).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

#: Bump when the generator changes in a way DRAFTS do not show.
GENERATOR_VERSION = 1

#: name -> what changes from the tiny model: the blocks kept (None: all), the tokens added
DRAFTS: dict[str, dict] = {
    "one-layer": {"blocks": 1, "add_tokens": 0},
    "extra-256": {"blocks": None, "add_tokens": 256},
}

#: Whether llama-server b11434 speculates with the draft (with --spec-type draft-simple).
COMPATIBLE = {"one-layer": True, "extra-256": False}

SEED = 4321  # the added tokens' embedding rows
INIT_STD = 0.02
USER_DEFINED = 4  # llama_token_type LLAMA_TOKEN_TYPE_USER_DEFINED, the type of each added token

# GGUF (docs/gguf.md in ggml): value types and the size of the fixed-size ones.
_UINT32, _INT32, _STRING, _ARRAY = 4, 5, 8, 9
_FIXED_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGML_F32, _GGML_F16 = 0, 1
_GGML_TYPE_SIZE = {_GGML_F32: 4, _GGML_F16: 2}  # the tiny model's only tensor types
DEFAULT_ALIGNMENT = 32


def cache_key(name: str, target: Path) -> str:
    material = json.dumps({"generator": GENERATOR_VERSION, "draft": DRAFTS[name], "seed": SEED,
                           "target": target.name}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def tiny_draft_gguf(target: Path, name: str = "one-layer") -> Path:
    """The cached draft `name` (a key of DRAFTS) of the tiny model `target` (tiny_gguf.tiny_llama_gguf), in the
    same directory, written first when missing; safe against concurrent writers (a temporary file renamed into
    place)."""
    out = target.parent / f"tiny-draft-{name}-{cache_key(name, target)}.gguf"
    if out.is_file() and out.stat().st_size > 0:
        return out
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        _write(target, name, partial)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return out


# --- reading the tiny model's bytes ---------------------------------------------------------------------------

def _string_at(buf: bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8:pos + 8 + n].decode(), pos + 8 + n


def _skip_value(buf: bytes, pos: int, vtype: int) -> int:
    if vtype in _FIXED_SIZE:
        return pos + _FIXED_SIZE[vtype]
    if vtype == _STRING:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    if vtype == _ARRAY:
        sub, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if sub in _FIXED_SIZE:
            return pos + count * _FIXED_SIZE[sub]
        for _ in range(count):
            pos = _skip_value(buf, pos, sub)
        return pos
    raise ValueError(f"unknown GGUF value type {vtype}")


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _kv(key: str, vtype: int, value: bytes) -> bytes:
    return _string(key) + struct.pack("<I", vtype) + value


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _write(target: Path, name: str, out: Path) -> None:
    import numpy as np

    spec = DRAFTS[name]
    buf = target.read_bytes()
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    assert magic == b"GGUF" and version == 3, (magic, version)
    pos = 24

    # The key-value section: each key's raw bytes, and where its value starts.
    kvs: list[tuple[str, int, int, int, int]] = []  # key, type, start, value start, end
    for _ in range(n_kv):
        start = pos
        key, pos = _string_at(buf, pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        value_start = pos + 4
        pos = _skip_value(buf, value_start, vtype)
        kvs.append((key, vtype, start, value_start, pos))
    values = {key: (vtype, vs, end) for key, vtype, _, vs, end in kvs}
    arch, _ = _string_at(buf, values["general.architecture"][1])
    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in values:
        alignment = struct.unpack_from("<I", buf, values["general.alignment"][1])[0]

    # The tensor infos: name, dimensions (ne, innermost first), type, offset into the data section.
    tensors: list[tuple[str, list[int], int, int]] = []
    for _ in range(n_tensors):
        tname, pos = _string_at(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = list(struct.unpack_from(f"<{n_dims}Q", buf, pos + 4))
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        tensors.append((tname, dims, ggml_type, offset))
    data_start = _align(pos, alignment)

    # What the draft changes.
    n_layers = struct.unpack_from("<I", buf, values[f"{arch}.block_count"][1])[0]
    blocks = spec["blocks"] if spec["blocks"] is not None else n_layers
    added = [f"<|tiny_draft_extra_{i}|>" for i in range(spec["add_tokens"])]
    _, tokens_at, tokens_end = values["tokenizer.ggml.tokens"]
    _, types_at, types_end = values["tokenizer.ggml.token_type"]
    sub, n_tokens = struct.unpack_from("<IQ", buf, tokens_at)
    assert sub == _STRING
    assert struct.unpack_from("<IQ", buf, types_at) == (_INT32, n_tokens)
    n_vocab = n_tokens + len(added)
    replaced = {
        "general.name": _string(f"tiny-draft-{name}"),
        f"{arch}.block_count": struct.pack("<I", blocks),
        f"{arch}.vocab_size": struct.pack("<I", n_vocab),
        "tokenizer.ggml.tokens": (struct.pack("<IQ", _STRING, n_vocab) + buf[tokens_at + 12:tokens_end]
                                  + b"".join(_string(t) for t in added)),
        "tokenizer.ggml.token_type": (struct.pack("<IQ", _INT32, n_vocab) + buf[types_at + 12:types_end]
                                      + struct.pack(f"<{len(added)}i", *[USER_DEFINED] * len(added))),
    }
    assert replaced.keys() <= values.keys(), sorted(replaced.keys() - values.keys())
    kv_bytes = b"".join(_kv(key, vtype, replaced[key]) if key in replaced else buf[start:end]
                        for key, vtype, start, _, end in kvs)

    # The tensors kept, with the embedding grown by a random row per added token.
    rng = np.random.default_rng(SEED)
    kept: list[tuple[str, list[int], int, bytes]] = []
    for tname, dims, ggml_type, offset in tensors:
        if tname.startswith("blk.") and int(tname.split(".")[1]) >= blocks:
            continue
        assert ggml_type in _GGML_TYPE_SIZE, f"{tname}: ggml type {ggml_type} is not F32 or F16"
        size = _GGML_TYPE_SIZE[ggml_type]
        for d in dims:
            size *= d
        data = buf[data_start + offset:data_start + offset + size]
        if tname == "token_embd.weight" and added:
            assert ggml_type == _GGML_F16 and dims[1] == n_tokens, (dims, ggml_type)
            rows = (rng.standard_normal((len(added), dims[0])) * INIT_STD).astype("<f2")
            data, dims = data + rows.tobytes(), [dims[0], n_vocab]
        kept.append((tname, dims, ggml_type, data))

    infos, offsets, at = [], [], 0
    for tname, dims, ggml_type, data in kept:
        offsets.append(at)
        infos.append(_string(tname) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
                     + struct.pack("<IQ", ggml_type, at))
        at = _align(at + len(data), alignment)

    with out.open("wb") as f:
        head = struct.pack("<4sIQQ", b"GGUF", version, len(kept), n_kv) + kv_bytes + b"".join(infos)
        f.write(head + bytes(_align(len(head), alignment) - len(head)))
        for (_, _, _, data), offset, following in zip(kept, offsets, offsets[1:] + [None]):
            f.write(data)
            if following is not None:
                f.write(bytes(following - offset - len(data)))
