"""The rendered init container `fetch-sources`, run as rendered against a stub of the Hugging Face Hub.

The command is the Deployment's own (`sh -c SCRIPT fetch-sources DEST REPO REV PATH ...`); the only change
is that the destination directories' /models prefix (the model cache's mount) becomes a temporary
directory. The Hub's address comes from HF_ENDPOINT, which both the curl script (llama.cpp's image) and
huggingface_hub's `hf download` (vLLM's image) read: here a loopback stub (kit.http_stub) that serves
the files and records every request.

curl (llama.cpp): each file lands where the server's --lora / --model names it, the token reaches the Hub as
a header and never a process argument, a second run asks nothing (the marker), and a 404 fails the
container leaving neither the file nor the marker. `hf download` (vLLM; huggingface_hub 2.x, what the
vLLM 0.34.0 image has): each adapter directory lands where --lora-modules names it, and a rerun asks
nothing. The Hub API paths the stub answers are huggingface_hub 2.4.0's (see HubStub).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from kit.http_stub import Reply, Request, json_reply, stub_servers
from kit.tools import missing, require_tool
from llama_operator.render.sources import FETCHED_ROOT, MARKER
from rendered_cases import FINETUNE_SPECS, adapter_paths, render_kind, render_spec

RUN_TIMEOUT_S = 60
#: huggingface_hub 2.4.0 asks for this best-effort (utils/_detect_agent.py:189-203; any failure is swallowed):
#: the stub answers 404, as for a Hub that does not have it.
AGENT_REGISTRY = "/api/agent-harnesses"
TOKEN = "hf_testtoken_5f2e9c0d"
MODELS = "/models"

#: A vLLM deployment with two PEFT adapters from the Hub: a whole repository at a tag, and a directory of
#: a repository at its default revision.
VLLM_ADAPTERS = {
    "model": "llama-3.1-8b-instruct", "runtime": "vllm", "memoryBudget": "40Gi",
    "slo": {"ttftP95": "2s", "tpotP95": "100ms", "concurrency": 4},
    "adapters": [{"name": "support", "source": "hf://acme/support-lora@v2", "rank": 16},
                 {"name": "sql", "source": "hf://acme/loras/sql", "rank": 8}],
    "source": {"hfTokenSecretRef": {"name": "hf", "key": "token"}},
}


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class HubStub:
    """The Hub's file and API routes for `repos` ({repo: {path: bytes}}), every revision resolving to one
    commit per repo; `missing` paths answer 404. Records (method, path, Authorization header) per request.

    Routes, as huggingface_hub 2.4.0 requests them (hf download -> snapshot_download / hf_hub_download):
    GET /api/models/{repo}/revision/{rev} -> {"id", "sha"} (hf_api.py:3202-3217; _snapshot_download.py:
    262-281); GET /api/models/{repo}/tree/{sha}?recursive=...&expand=... -> [{"type": "file", "path", "size",
    "oid"}] (hf_api.py:4019-4027, 711-726), no xetHash, so plain HTTP; HEAD and GET /{repo}/resolve/{rev}/{path}
    with X-Repo-Commit, ETag and Content-Length (file_download.py:289-295, 1669-1689; constants.py:94-96),
    which is also the URL the curl script requests."""

    repos: dict[str, dict[str, bytes]]
    missing: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()

    def sha(self, repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def __call__(self, request: Request) -> Reply:
        with self._lock:
            self.requests.append((request.method, request.path, request.headers.get("Authorization")))
        path = unquote(urlsplit(request.path).path)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
        if m and m.group(1) in self.repos:
            return json_reply({"id": m.group(1), "sha": self.sha(m.group(1))})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([0-9a-f]{40})", path)
        if m and m.group(1) in self.repos:
            files = self.repos[m.group(1)]
            return json_reply([{"type": "file", "path": p, "size": len(c), "oid": git_blob_sha1(c)}
                               for p, c in sorted(files.items())])
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and m.group(1) in self.repos and m.group(3) in self.repos[m.group(1)] and m.group(3) not in self.missing:
            content = self.repos[m.group(1)][m.group(3)]
            return Reply(200, content, "application/octet-stream", (
                ("X-Repo-Commit", self.sha(m.group(1))), ("ETag", f'"{git_blob_sha1(content)}"')))
        if path != AGENT_REGISTRY:
            with self._lock:
                self.unanswered.append(f"{request.method} {request.path}")
        return Reply(404)

    def repo_requests(self) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if urlsplit(r[1]).path != AGENT_REGISTRY]


def local(path: str, root: Path) -> Path:
    assert path.startswith(MODELS + "/"), path
    return root / path[len(MODELS) + 1:]


def run_init(init: dict, root: Path, endpoint: str, token: str | None = None,
             path_dirs: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The init container's command as rendered, its /models destinations moved under `root`; the
    environment is the container's (HOME, HF_TOKEN when it has one) with the stub's HF_ENDPOINT."""
    command = [local(a, root).as_posix() if a.startswith(FETCHED_ROOT) else a for a in init["command"]]
    assert command[:2] == ["sh", "-c"] and command[3] == "fetch-sources", command[:4]
    env = {"PATH": os.pathsep.join([*path_dirs, "/usr/bin", "/bin"]), "HOME": str(root / "home"),
           "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if token is not None:
        assert [e["name"] for e in init["env"] if "valueFrom" in e] == ["HF_TOKEN"]  # from the Secret
        env["HF_TOKEN"] = token
    (root / "home").mkdir(parents=True, exist_ok=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          check=False)


# --- curl (llama.cpp's image) ----------------------------------------------------------------------------

ADAPTERS = {"acme/tiny-lora": {"support.gguf": b"GGUF support adapter bytes\n" * 100},
            "acme/tiny-sql-lora": {"adapters/sql.gguf": b"GGUF sql adapter bytes\n" * 50}}


@pytest.fixture
def curl_shim(tmp_path) -> tuple[str, Path]:
    """A `curl` first on PATH that records its arguments and runs the real one."""
    real = require_tool("curl")
    shim_dir, argv_log = tmp_path / "shim", tmp_path / "curl-argv.log"
    shim_dir.mkdir()
    shim = shim_dir / "curl"
    shim.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{argv_log}"\nexec "{real}" "$@"\n')
    shim.chmod(0o755)
    return str(shim_dir), argv_log


def lora_two_with_token():
    spec = {**FINETUNE_SPECS["lora-two"], "source": {"hfTokenSecretRef": {"name": "hf", "key": "token"}}}
    return render_spec(spec)


def test_curl_puts_each_adapter_where_the_server_args_name_it(tmp_path, curl_shim):
    r = render_kind("lora-two")
    assert r.init_container["image"] == r.container["image"]  # the server's own image, which has curl
    hub = HubStub(ADAPTERS)
    with stub_servers() as serve:
        stub = serve(hub)
        done = run_init(r.init_container, tmp_path, stub.url, path_dirs=(curl_shim[0],))
    assert done.returncode == 0, done.stderr
    assert hub.unanswered == []
    contents = [ADAPTERS["acme/tiny-lora"]["support.gguf"], ADAPTERS["acme/tiny-sql-lora"]["adapters/sql.gguf"]]
    for path, content in zip(adapter_paths(r), contents):
        assert local(path, tmp_path).read_bytes() == content
        assert (local(path, tmp_path).parents[1 if "/adapters/" in path else 0] / MARKER).is_file()
    assert [m for m, _, _ in hub.requests] == ["GET", "GET"]
    assert {p for _, p, _ in hub.requests} == {"/acme/tiny-lora/resolve/v1/support.gguf",
                                               "/acme/tiny-sql-lora/resolve/main/adapters/sql.gguf"}
    assert [a for _, _, a in hub.requests] == [None, None]  # no token, no header
    assert not list(tmp_path.rglob("*.part"))


def test_curl_sends_the_token_as_a_header_never_as_an_argument(tmp_path, curl_shim):
    r = lora_two_with_token()
    assert TOKEN not in json.dumps(r.pod)  # the Deployment names the Secret, never its value
    hub = HubStub(ADAPTERS)
    with stub_servers() as serve:
        stub = serve(hub)
        done = run_init(r.init_container, tmp_path, stub.url, token=TOKEN, path_dirs=(curl_shim[0],))
    assert done.returncode == 0, done.stderr
    assert [a for _, _, a in hub.requests] == [f"Bearer {TOKEN}"] * 2
    argv = curl_shim[1].read_text()
    assert argv.count("--header @-") == 2, argv  # each curl read its header from standard input ...
    assert TOKEN not in argv  # ... and none had the token among its arguments


def test_curl_a_second_run_asks_the_hub_nothing(tmp_path):
    r = render_kind("lora-two")
    hub = HubStub(ADAPTERS)
    with stub_servers() as serve:
        stub = serve(hub)
        first = run_init(r.init_container, tmp_path, stub.url)
        assert first.returncode == 0, first.stderr
        asked = len(hub.requests)
        again = run_init(r.init_container, tmp_path, stub.url)
    assert again.returncode == 0, again.stderr
    assert asked == 2 and len(hub.requests) == asked
    assert again.stdout.count("cached: ") == 2, again.stdout


def test_curl_a_404_fails_and_leaves_neither_the_file_nor_the_marker(tmp_path):
    r = render_kind("lora-two")
    hub = HubStub(ADAPTERS, missing={"adapters/sql.gguf"})
    with stub_servers() as serve:
        stub = serve(hub)
        done = run_init(r.init_container, tmp_path, stub.url)
    assert done.returncode != 0
    assert "404" in done.stderr, done.stderr  # curl's own words in the container's log
    support, sql = (local(p, tmp_path) for p in adapter_paths(r))
    assert support.is_file() and (support.parent / MARKER).is_file()  # the first source is done and kept
    assert not sql.exists()
    assert not (sql.parents[1] / MARKER).exists()


# --- hf download (vLLM's image) --------------------------------------------------------------------------

PEFT = {
    "acme/support-lora": {"adapter_config.json": b'{"r": 16, "peft_type": "LORA"}',
                          "adapter_model.safetensors": b"\x00" * 4096, "README.md": b"support\n"},
    "acme/loras": {"sql/adapter_config.json": b'{"r": 8, "peft_type": "LORA"}',
                   "sql/adapter_model.safetensors": b"\x01" * 2048,
                   "other/adapter_config.json": b'{"r": 4}'},
}


@pytest.fixture(scope="module")
def hf_bin() -> str:
    """The `hf` console script of huggingface_hub 2.x (the test extra installs it beside pytest)."""
    found = require_tool("hf")  # .tools/bin, the venv's bin, PATH
    version = subprocess.run([found, "version"], capture_output=True, text=True, timeout=30, check=False)
    found_version = re.search(r"version:\s*(\S+)", version.stdout)
    if found_version is None or not found_version.group(1).startswith("2."):
        missing(f"`hf` is not huggingface_hub 2.x (scripts/setup.sh test): {version.stdout or version.stderr}")
    return found


def test_hf_download_puts_each_adapter_where_lora_modules_names_it(tmp_path, hf_bin):
    r = render_spec(VLLM_ADAPTERS, "l4-pool.yaml")
    args = r.args
    assert args.count("--lora-modules") == 1
    modules = args[args.index("--lora-modules") + 1:args.index("--lora-modules") + 3]
    hub = HubStub(PEFT)
    with stub_servers() as serve:
        stub = serve(hub)
        done = run_init(r.init_container, tmp_path, stub.url, token=TOKEN,
                        path_dirs=(str(Path(hf_bin).parent),))
        assert done.returncode == 0, done.stdout + done.stderr
        first = list(hub.requests)
        again = run_init(r.init_container, tmp_path, stub.url, token=TOKEN,
                         path_dirs=(str(Path(hf_bin).parent),))
    assert hub.unanswered == [], hub.unanswered
    support, sql = (local(m.split("=", 1)[1], tmp_path) for m in modules)
    assert [m.split("=", 1)[0] for m in modules] == ["support", "sql"]
    for name, content in PEFT["acme/support-lora"].items():
        assert (support / name).read_bytes() == content
    assert (sql / "adapter_config.json").read_bytes() == PEFT["acme/loras"]["sql/adapter_config.json"]
    assert (sql / "adapter_model.safetensors").read_bytes() == PEFT["acme/loras"]["sql/adapter_model.safetensors"]
    assert not (sql.parent / "other").exists()  # --include sql/*: the rest of the repository stays behind
    assert (support / MARKER).is_file() and (sql.parent / MARKER).is_file()
    assert {a for _, p, a in first if urlsplit(p).path != AGENT_REGISTRY} == {f"Bearer {TOKEN}"}  # HF_TOKEN reaches the Hub
    assert any("/resolve/" in p for _, p, _ in hub.repo_requests())
    assert TOKEN not in json.dumps(r.pod)
    # The marker: nothing asked the second time.
    assert again.returncode == 0, again.stderr
    assert len(hub.requests) == len(first)
    assert again.stdout.count("cached: ") == 2, again.stdout
