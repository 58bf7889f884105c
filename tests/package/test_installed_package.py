"""The package as users install it: a wheel built from the project's sources, installed with the `sandbox`
extra into a fresh virtualenv outside the clone, and run from a directory outside the clone.

`llama-operator sandbox` once looked its example clusters and LlamaDeployments up next to site-packages;
they are package data now (llama_operator/examples/, which the repository's top-level examples/ links
to). The wheel is built from a copy of what `pip install .` and the Docker build see (pyproject.toml,
README.md, operator/: the .dockerignore allow-list), so nothing outside it can leak into the package.

Building needs setuptools and installing needs the runtime dependencies: pip fetches them from PyPI
(through pip's cache). Without network access the tests skip on a developer's machine; under CI
(``CI=true``) they fail instead, like every missing tool (tests/kit/tools.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from kit.paths import ROOT
from kit.tools import in_ci

PACKAGE_EXAMPLES = ROOT / "operator" / "llama_operator" / "examples"
TOP_EXAMPLES = ROOT / "examples"
#: What `pip install .` needs (operator/Dockerfile's build context, .dockerignore).
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "operator")
#: pip's answers when it cannot reach the package index (the only reason to skip, and never under CI).
OFFLINE = ("Failed to establish a new connection", "Temporary failure in name resolution", "Network is unreachable",
           "No matching distribution found", "Could not find a version that satisfies", "ProxyError",
           "Max retries exceeded", "ConnectTimeoutError")
INSTALL_TIMEOUT = 900
RUN_TIMEOUT = 240


def _clean_env(venv: Path | None = None) -> dict[str, str]:
    """The environment of a shell where only `venv` is active: nothing of the clone's virtualenv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH")}
    path = [p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
            if p and not Path(p).resolve().is_relative_to(ROOT.resolve())]
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
        path.insert(0, str(venv / "bin"))
    env["PATH"] = os.pathsep.join(path)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.pop("PIP_NO_CACHE_DIR", None)  # reuse pip's cache: installing takes a minute, not several
    return env


def _pip(what: str, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    if proc.returncode == 0:
        return
    output = f"{what} failed ({proc.returncode}): {' '.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if not in_ci() and any(marker in proc.stdout + proc.stderr for marker in OFFLINE):
        pytest.skip(f"no package index to install from (CI=true makes this a failure):\n{output}")
    pytest.fail(output)


class Installed:
    """The built wheel, and a virtualenv outside the clone with it installed (extra `sandbox`)."""

    def __init__(self, root: Path):
        self.root = root
        self.venv = root / "venv"
        self.work = root / "work"  # the cwd of every command: outside the clone
        self.work.mkdir()
        self.wheel = self._build()
        self._install()
        self.examples = Path(self.python("-c", "import importlib.resources as r; "
                                         "print(r.files('llama_operator') / 'examples')").stdout.strip())

    def _build(self) -> Path:
        src = self.root / "src"
        src.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
        for name in SOURCES:
            path = ROOT / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=ignore)  # files behind symlinks are copied as files
            elif path.is_file():
                shutil.copy2(path, src / name)
        dist = self.root / "dist"
        _pip("building the wheel", [sys.executable, "-m", "pip", "wheel", "--no-deps", str(src), "-w", str(dist)],
             self.work, _clean_env())
        (wheel,) = dist.glob("llama_operator-*.whl")
        return wheel

    def _install(self) -> None:
        env = _clean_env()
        base = getattr(sys, "_base_executable", None) or sys.executable  # not the clone's venv interpreter
        subprocess.run([base, "-m", "venv", str(self.venv)], check=True, cwd=self.work, env=env, timeout=120)
        _pip("installing the wheel", [str(self.venv / "bin" / "python"), "-m", "pip", "install",
                                      f"llama-operator[sandbox] @ {self.wheel.as_uri()}"], self.work, env)

    def run(self, *argv: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.venv / "bin" / argv[0]), *argv[1:]], cwd=self.work, env=_clean_env(self.venv),
                              capture_output=True, text=True, timeout=timeout)

    def python(self, *argv: str) -> subprocess.CompletedProcess[str]:
        proc = self.run("python", *argv)
        assert proc.returncode == 0, proc.stderr
        return proc

    def operator(self, *argv: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
        proc = self.run("llama-operator", *argv, timeout=timeout)
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("installed-package")
    assert not root.resolve().is_relative_to(ROOT.resolve()), "the virtualenv must live outside the clone"
    return Installed(root)


# --- One copy of each example --------------------------------------------------------------------------


def _relative_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.yaml")}


def test_top_level_examples_are_links_to_the_package_data():
    bundled = _relative_files(PACKAGE_EXAMPLES)
    assert {"clusters/mixed.yaml", "clusters/h100-8x.yaml"} <= bundled
    for rel in bundled:
        assert not (PACKAGE_EXAMPLES / rel).is_symlink(), f"the package's {rel} must be the file itself"
    for path in TOP_EXAMPLES.rglob("*.yaml"):
        rel = path.relative_to(TOP_EXAMPLES).as_posix()
        assert path.is_symlink(), f"examples/{rel} is a second copy: make it a link into {PACKAGE_EXAMPLES}"
        assert path.resolve() == (PACKAGE_EXAMPLES / rel).resolve(), f"examples/{rel} links elsewhere"
    assert _relative_files(TOP_EXAMPLES) == bundled  # every bundled example is reachable from examples/


def test_the_sandbox_defaults_are_bundled():
    from llama_operator.cli import SANDBOX_DEFAULT_EXAMPLES
    from llama_operator.sandbox.demo import EXAMPLES

    assert EXAMPLES.resolve() == PACKAGE_EXAMPLES.resolve()
    for name in [*SANDBOX_DEFAULT_EXAMPLES, "clusters/mixed.yaml", "clusters/h100-8x.yaml"]:
        assert (PACKAGE_EXAMPLES / name).is_file(), name


# --- The wheel and the installed package ---------------------------------------------------------------


def test_the_wheel_carries_every_example_as_a_file(installed: Installed):
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        for rel in _relative_files(PACKAGE_EXAMPLES):
            member = f"llama_operator/examples/{rel}"
            assert member in names, f"{member} is not in {installed.wheel.name}"
            assert wheel.read(member) == (PACKAGE_EXAMPLES / rel).read_bytes(), member
        assert "llama_operator/catalog/models.yaml" in names and "llama_operator/render/vllm.yaml.j2" in names


def test_the_installed_package_is_the_wheel_not_the_clone(installed: Installed):
    where = Path(installed.python("-c", "import llama_operator; print(llama_operator.__file__)").stdout.strip())
    assert where.is_relative_to(installed.venv), where
    assert installed.examples.is_relative_to(installed.venv)
    assert (installed.examples / "clusters" / "mixed.yaml").is_file()


def test_sandbox_runs_from_the_installed_package(installed: Installed):
    # The default cluster, LlamaDeployments and joining nodes, all from the package; a short scenario.
    proc = installed.operator("sandbox", "--upgrade-delay", "1", "--timeout", "60")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    nodes = [n for n in yaml.safe_load((PACKAGE_EXAMPLES / "clusters" / "mixed.yaml").read_text())["items"]
             if n.get("kind") == "Node"]
    assert f"loaded the CRD and {len(nodes)} nodes from examples/clusters/mixed.yaml" in out, out
    assert "applied 6 LlamaDeployments from examples/chat.yaml" in out, out
    assert "join from examples/clusters/h100-8x.yaml" in out and "leave again" in out, out
    first_table = out.split("$ kubectl get llamadeployments\n", 1)[1].split("\n\n", 1)[0].splitlines()
    phases = {row.split()[0]: row.split()[-1] for row in first_table[1:]}
    assert phases == {"assistant-70b": "Ready", "chat": "Ready", "chat-11b-vision": "Ready",
                      "impossible": "Unschedulable", "tiny": "Ready", "vision-90b": "Ready"}, out
    assert "Upgraded" in out, out  # the joined H100 node was used
    # The SLO loop (docs/slo-loop.md): the slow engine corrected and re-planned, the busy one scaled out, the
    # one that meets its SLO left alone; each said in an Event that names what was observed.
    slo = out.split("--- the SLO loop:", 1)[1]
    rows = {r.split()[0]: r for r in slo.split("$ kubectl get llamadeployments", 1)[1].splitlines()[2:5]}
    assert "True Met" in rows["meets-slo"] and "3/3" in rows["busy"], slo
    assert "llama-3.1-8b-instruct/f16" not in rows["slow-engine"], slo  # moved off the slow variant
    assert "busy: ScaledOut: Load above the plan" in slo and "from 1 to 3 replica(s)" in slo, slo
    assert "slow-engine: SLOBreached:" in slo and "slow-engine: Replanned:" in slo, slo
    factor = re.search(r"slow-engine: correction llama-3\.1-8b-instruct/f16 on 1x NVIDIA-L4: TTFT x[0-9.]+, "
                       r"TPOT x([0-9.]+)", slo)
    assert factor and 3.8 <= float(factor.group(1)) <= 4.2, slo  # the sandbox's latency-factor 4, measured
    assert "meets-slo:" not in slo.split("Events:", 1)[1], slo
    # Fine-tuned models (docs/adapters.md): the pinned base quantized, the adapters' flags and the fetch.
    ft = out.split("--- fine-tuned models:", 1)[1]
    rows = {r.split()[0]: r.split() for r in ft.split("$ kubectl get llamadeployments\n", 1)[1].split("\n\n")[0]
            .splitlines()[1:]}
    assert rows["support"][2] == "llama-3.1-8b-instruct/fp8" and rows["support"][-2:] == ["2", "Ready"], ft
    assert rows["legal"][2] == "llama-3.1-8b-instruct/fp8" and rows["edge"][-2:] == ["2", "Ready"], ft
    assert "--enable-lora --lora-modules support-en=/models/llama-operator/sources/" in ft, ft
    assert "--max-loras 2 --max-lora-rank 64" in ft and "--quantization fp8_per_tensor" in ft, ft
    assert "--lora-scaled /sources/lora-adapters/faq/faq-lora-F16.gguf:0" in ft and "--no-cache-prompt" in ft, ft
    assert "init container fetch-sources fetches into the model cache: acme/llama-3.1-8b-legal@v2" in ft, ft
    assert 'support: support-de [Ready] "model": "support-de"' in ft, ft
    # Speculative decoding (docs/speculative.md): both planned bf16 with a 1B draft; the SLO loop turns off the
    # draft of the one whose engine accepts 20% of drafted tokens (DraftOff) and re-plans it to FP8; the other
    # keeps its draft.
    sd = out.split("--- speculative decoding:", 1)[1].split("--- replicas across nodes:", 1)[0]
    planned, looped = sd.split("--- the SLO loop counts accepted over drafted tokens", 1)
    rows = {r.split()[0]: r.split() for r in planned.split("$ kubectl get llamadeployments\n", 1)[1]
            .split("Rendered draft arguments:", 1)[0].splitlines()[1:]}
    draft = "llama-3.1-8b-instruct/bf16+llama-3.2-1b-instruct"
    assert rows["chat-8b-draft"][2] == rows["code-8b-draft"][2] == draft, sd
    assert rows["chat-8b-draft"][-1] == rows["code-8b-draft"][-1] == "Ready", sd
    assert planned.count('--speculative-config {"method":"draft_model","model":"meta-llama/Llama-3.2-1B-Instruct",'
                         '"num_speculative_tokens":') == 2, sd
    rows = {r.split()[0]: r.split() for r in looped.split("$ kubectl get llamadeployments\n", 1)[1]
            .split("Events:", 1)[0].splitlines()[1:]}
    assert rows["chat-8b-draft"][2] == draft and rows["code-8b-draft"][2] == "llama-3.1-8b-instruct/fp8", sd
    assert rows["code-8b-draft"][-1] == "Ready", sd
    assert re.search(r"code-8b-draft: DraftOff: Turning the llama-3\.2-1b-instruct draft off: 2\d% of drafted "
                     r"tokens were accepted, below the 3\d%", looped), sd
    assert "code-8b-draft: Replanned:" in looped and "chat-8b-draft: DraftOff" not in looped, sd
    assert re.search(r"chat-8b-draft: .*observed 6\d% accepted", looped), sd
    assert "code-8b-draft: llama-3.1-8b-instruct/fp8, no draft" in looped, sd
    # Replicas across nodes (docs/multinode.md): 405B bf16 on two 8x H100 nodes as one LeaderWorkerSet group,
    # FP8 on the node left (a Deployment) when the other leaves, the group removed.
    mn = out.split("--- replicas across nodes:", 1)[1]
    spanned, fell_back = mn.split("leaves: the group has lost a node", 1)
    assert "llama-3.1-405b-instruct/bf16" in spanned and "1/1" in spanned, mn
    assert "LeaderWorkerSet assistant-405b-group: 1 group(s) of 2 pods, 1 ready" in spanned, mn
    assert "--pipeline-parallel-size 2" in spanned and "--headless" in spanned, mn
    assert "llama-3.1-405b-instruct/fp8" in fell_back and "Ready" in fell_back, mn
    assert "assistant-405b: Replanned:" in fell_back, mn


def test_plan_on_the_bundled_examples(installed: Installed):
    ex = installed.examples
    proc = installed.operator("plan", "-f", str(ex / "vision-90b-on-l4.yaml"), "--cluster",
                              str(ex / "clusters" / "l4-pool.yaml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    chosen = next(line for line in proc.stdout.splitlines() if line.strip().startswith("Chosen"))
    assert "llama-3.2-11b-vision-instruct" in chosen and "1x NVIDIA-L4" in chosen and "[FALLBACK]" in chosen
    proc = installed.operator("plan", "-f", str(ex / "impossible.yaml"), "--cluster",
                              str(ex / "clusters" / "h100-8x.yaml"), "-o", "json")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    d = json.loads(proc.stdout)
    assert d["feasible"] is False and d["candidates"] and all(c["reasons"] for c in d["candidates"])
    proc = installed.operator("plan", "-f", str(installed.work / "missing.yaml"), "--cluster",
                              str(ex / "clusters" / "mixed.yaml"))
    assert proc.returncode == 1 and proc.stderr.startswith("error:"), proc.stderr


def test_render_on_the_bundled_examples(installed: Installed):
    ex = installed.examples
    proc = installed.operator("render", "-f", str(ex / "chat.yaml"), "--cluster",
                              str(ex / "clusters" / "mixed.yaml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service"} <= kinds, kinds
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["metadata"]["name"] == "chat" and deployment["metadata"]["namespace"] == "default"
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].startswith("vllm/vllm-openai:")


def test_crd_from_the_installed_package(installed: Installed):
    from llama_operator.crd import render_crd

    proc = installed.operator("crd", "--stdout")
    assert proc.returncode == 0, proc.stderr
    crd = yaml.safe_load(proc.stdout)
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == "llamadeployments.llama-operator.dev"
    assert proc.stdout == render_crd()  # the same API models as the clone's
    assert not list(installed.work.iterdir()), "crd --stdout wrote a file"
