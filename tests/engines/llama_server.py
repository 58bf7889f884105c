"""Starting a real llama-server on 127.0.0.1 for a test, bounded in time, and always stopping it.

    with LlamaServer(binary, args, workdir) as server:   # started, and healthy (or ServerFailed)
        server.get("/health")
    # stopped here (SIGTERM, then SIGKILL), whatever happened

`ServerFailed` carries the exit code and the tail of the server's stderr, so a flag the server rejects
shows up in the test report as the server's own words.
"""
from __future__ import annotations

import ctypes
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
HEALTH_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


class ServerFailed(AssertionError):
    """llama-server exited or never became healthy in time. An AssertionError, so pytest reports it as a
    test failure with the message (which holds the server's stderr)."""

    def __init__(self, message: str, returncode: int | None, stderr: str):
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def local_args(rendered: list[str], model: Path, port: int, adapters: dict[str, Path] | None = None,
               draft: Path | None = None) -> list[str]:
    """The operator's rendered llama-server arguments, runnable here. Only these swaps, nothing else:
    the weights: `--hf-repo R --hf-file F` (a download from Hugging Face) becomes `--model <local gguf>` in the
    same place, and so does the value of `--model` (a fine-tune's GGUF, fetched into the pod's model cache);
    the file of each `--lora FILE` and `--lora-scaled FILE:SCALE` becomes its local stand-in in `adapters`
    (rendered path -> local file; every rendered adapter must have one), the scale kept; the draft model's
    `--spec-draft-hf R --spec-draft-model F` (the draft's file in a Hugging Face repository) becomes
    `--spec-draft-model <draft>`, in the place of the rendered --spec-draft-model (a rendered draft must have a
    stand-in; the other draft flags, --spec-type and --spec-draft-n-max among them, stay); the `--host` value
    becomes 127.0.0.1 (the pod listens on 0.0.0.0; a test must not); and the `--port` value becomes a free
    port (the pod's 8080 may be taken here). Every other flag and value stays as rendered."""
    adapters = adapters or {}
    out: list[str] = []
    seen = set()
    i = 0
    while i < len(rendered):
        flag = rendered[i]
        if flag in ("--hf-repo", "--model"):
            out += ["--model", str(model)]
            seen.add("weights")
            seen.add(flag)
            i += 2
        elif flag == "--hf-file":
            seen.add(flag)
            i += 2
        elif flag == "--lora":
            path = rendered[i + 1]
            assert path in adapters, f"no local stand-in for the rendered adapter {path}: {adapters}"
            out += [flag, str(adapters[path])]
            i += 2
        elif flag == "--lora-scaled":
            path, sep, scale = rendered[i + 1].rpartition(":")
            assert sep and path in adapters, f"no local stand-in for the rendered adapter {rendered[i + 1]}: {adapters}"
            out += [flag, f"{adapters[path]}:{scale}"]
            i += 2
        elif flag == "--spec-draft-model":
            assert draft is not None, f"no local stand-in for the rendered draft {rendered[i + 1]}"
            out += [flag, str(draft)]
            seen.add(flag)
            i += 2
        elif flag == "--spec-draft-hf":
            seen.add(flag)
            i += 2
        elif flag == "--host":
            out += [flag, HOST]
            seen.add(flag)
            i += 2
        elif flag == "--port":
            out += [flag, str(port)]
            seen.add(flag)
            i += 2
        else:
            out.append(flag)
            i += 1
    wanted = {"weights", "--host", "--port"} | ({"--hf-file"} if "--hf-repo" in seen else set()) | (
        {"--spec-draft-model"} if "--spec-draft-hf" in seen else set())
    missing = wanted - seen
    assert not missing, f"the rendered args lack {sorted(missing)}: {rendered}"
    return out


def _server_env() -> dict[str, str]:
    # llama-server also reads its flags from LLAMA_ARG_* variables; a developer's shell must not add any.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    # Logging only: at the default verbosity (3) libllama's own INFO lines (the KV cache's types and size,
    # the context's flash-attention setting) are dropped (common_log_get_verbosity maps them to trace, 4).
    # The tests read them to check that the rendered cache flags took effect. No flag is added.
    env["LLAMA_ARG_LOG_VERBOSITY"] = "4"
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # PR_SET_PDEATHSIG: should pytest itself be killed (no teardown), the server gets SIGKILL too, so a
    # server never outlives the run that started it.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def json(self):
        return json.loads(self.body)


class LlamaServer:
    def __init__(self, binary: str, args: list[str], workdir: Path, port: int,
                 health_timeout: float = HEALTH_TIMEOUT_S):
        self.binary = binary
        self.args = list(args)
        self.port = port
        self.health_timeout = health_timeout
        workdir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = workdir / "llama-server.stdout"
        self.stderr_path = workdir / "llama-server.stderr"
        self.proc: subprocess.Popen | None = None
        #: /health as seen while starting: status codes, or "refused" before the port was bound.
        self.startup_statuses: list[int | str] = []
        self.startup_seconds: float | None = None

    # -- lifecycle ----------------------------------------------------------------------------------

    def __enter__(self) -> "LlamaServer":
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen([self.binary, *self.args], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, env=_server_env(), start_new_session=True,
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)

    def stderr(self, tail: int = 40) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-tail:])

    def _failed(self, why: str) -> ServerFailed:
        code = self.proc.poll() if self.proc else None
        text = self.stderr()
        return ServerFailed(f"llama-server {why} (exit code {code}); args: {' '.join(self.args)}\n"
                            f"--- stderr (last lines) ---\n{text}", code, text)

    def wait_healthy(self) -> None:
        """Poll /health until 200. Fails at once when the process exits, and after health_timeout seconds."""
        assert self.proc is not None
        start = time.monotonic()
        deadline = start + self.health_timeout
        while True:
            if self.proc.poll() is not None:
                raise self._failed("exited before it was healthy")
            try:
                status = self.get("/health", timeout=2).status
            except (ConnectionError, socket.timeout, http.client.HTTPException, OSError):
                status = "refused"
            if not self.startup_statuses or self.startup_statuses[-1] != status:
                self.startup_statuses.append(status)
            if status == 200:
                self.startup_seconds = time.monotonic() - start
                return
            if time.monotonic() > deadline:
                raise self._failed(f"was not healthy within {self.health_timeout:.0f} s "
                                   f"(/health: {self.startup_statuses})")
            time.sleep(0.02)

    # -- HTTP ---------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 30) -> Response:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            return Response(resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()})
        finally:
            conn.close()

    def get(self, path: str, timeout: float = 30) -> Response:
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body: dict, timeout: float = 60) -> Response:
        return self.request("POST", path, body, timeout=timeout)
