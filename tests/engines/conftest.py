"""Fixtures for tests/engines: a real llama.cpp `llama-server` running what the operator renders.

* engine: the llama-server binary scripts/build_llama_server.sh built and cached outside the clone, and the
  Llama 3 vocab beside it. Found by asking that script (`--print-path`, which only looks), so the cache key
  lives in one place; LLAMA_SERVER_BIN (and LLAMA_VOCAB_GGUF) override. Missing: a failure under CI=true
  (kit.tools.missing, the rule for promtool and helm too), a skip naming the build command elsewhere.
* tiny_gguf: a 2-layer random-weight Llama GGUF with Llama 3's tokenizer (tiny_gguf.py), cached.
* servers.get(kind): one llama-server per distinct rendered command line (rendered_cases.SPECS,
  FINETUNE_SPECS and SPECULATIVE_SPECS; adapters played by tiny_lora_gguf.py's files, a draft model by
  tiny_draft_gguf.py's one-layer draft), started on first use and kept for the session; stopped at its end,
  whatever happens.
* start_server(args, port): a one-off server, stopped at the end of the test.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from kit.paths import ROOT
from kit.tools import missing

from llama_server import LlamaServer, free_port, local_args
from rendered_cases import adapter_stand_ins, draft_stand_in, render_kind
from tiny_gguf import tiny_llama_gguf

BUILD_SCRIPT = ROOT / "scripts" / "build_llama_server.sh"


@dataclass(frozen=True)
class Engine:
    binary: Path
    vocab: Path


@pytest.fixture(scope="session")
def engine() -> Engine:
    hint = "run scripts/build_llama_server.sh (about 9 minutes; `scripts/setup.sh test` runs it too)"
    if os.environ.get("LLAMA_SERVER_BIN"):
        binary = Path(os.environ["LLAMA_SERVER_BIN"])
    else:
        found = subprocess.run(["bash", str(BUILD_SCRIPT), "--print-path"], capture_output=True, text=True,
                               timeout=30)
        if found.returncode != 0:
            missing(f"llama-server is not built: {hint}")
        binary = Path(found.stdout.strip().splitlines()[-1])
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        missing(f"llama-server {binary} is not an executable file: {hint}")
    vocab = Path(os.environ.get("LLAMA_VOCAB_GGUF") or binary.parent.parent / "ggml-vocab-llama-bpe.gguf")
    if not vocab.is_file():
        missing(f"the Llama 3 vocab {vocab} is missing (set LLAMA_VOCAB_GGUF): {hint}")
    return Engine(binary, vocab)


@pytest.fixture(scope="session")
def tiny_gguf(engine: Engine) -> Path:
    return tiny_llama_gguf(engine.vocab)


class Servers:
    """One running llama-server per distinct command line, for the whole session."""

    def __init__(self, engine: Engine, model: Path, workdir: Path):
        self.engine, self.model, self.workdir = engine, model, workdir
        self._stack = contextlib.ExitStack()
        self._by_kind: dict[str, LlamaServer] = {}

    def get(self, kind: str) -> LlamaServer:
        if kind not in self._by_kind:
            port = free_port()
            # The image runs /app/llama-server (the release's `command`); here the same release's local build.
            rendered = render_kind(kind)
            args = local_args(rendered.args, self.model, port, adapter_stand_ins(rendered),
                              draft_stand_in(rendered, self.model))
            server = LlamaServer(str(self.engine.binary), args, self.workdir / kind, port)
            self._by_kind[kind] = self._stack.enter_context(server)
        return self._by_kind[kind]

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="session")
def servers(engine: Engine, tiny_gguf: Path, tmp_path_factory):
    pool = Servers(engine, tiny_gguf, tmp_path_factory.mktemp("llama-server"))
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def start_server(engine: Engine, tiny_gguf: Path, tmp_path: Path):
    """For one-off servers (the negative control): start(args, timeout) -> a started, healthy server, or
    ServerFailed. Stopped at the end of the test."""
    started: list[LlamaServer] = []

    def start(args: list[str], port: int, health_timeout: float = 60.0) -> LlamaServer:
        server = LlamaServer(str(engine.binary), args, tmp_path / f"server-{len(started)}", port, health_timeout)
        started.append(server)
        return server.__enter__()

    yield start
    for server in started:
        server.stop()
