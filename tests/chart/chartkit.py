"""Helpers and fixtures for the Helm chart tests: a helm binary with a private home, and cached renders.

`render(*args)` runs `helm template` on charts/llama-operator (CRDs included) and returns the
documents; `scenario(name)` renders one of the named value sets every test module shares.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from kit.paths import ROOT
from kit.tools import require_tool

CHART = ROOT / "charts" / "llama-operator"
RELEASE = "llm"
NAMESPACE = "llama-system"
FULLNAME = f"{RELEASE}-llama-operator"
WATCHED = ["team-a", "team-b"]

# The value sets the tests render: defaults, everything on, and the namespaced install.
SCENARIOS: dict[str, list[str]] = {
    "default": [],
    "all-on": ["-f", str(CHART / "ci" / "all-on-values.yaml")],
    "namespaced": [
        "--set", "watch.namespaced=true",
        "--set", "watch.namespaces={" + ",".join(WATCHED) + "}",
    ],
    "namespaced-all-on": [
        "-f", str(CHART / "ci" / "all-on-values.yaml"),
        "--set", "watch.namespaced=true",
        "--set", "watch.namespaces={" + ",".join(WATCHED) + "}",
    ],
    # A namespaced install that reads Pods in the watched namespaces only.
    "namespaced-own-pods": [
        "--set", "watch.namespaced=true",
        "--set", "watch.namespaces={" + ",".join(WATCHED) + "}",
        "--set", "watch.podsAllNamespaces=false",
    ],
}


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory):
    """Run helm with HELM_*_HOME in a temp dir; returns run(*args, check=True) -> CompletedProcess."""
    binary = require_tool("helm")
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ)
    env.update(
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_DATA_HOME=str(home / "data"),
    )

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [binary, *args], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
        )
        if check and proc.returncode != 0:
            pytest.fail(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


@pytest.fixture(scope="session")
def render(helm):
    """render(*extra_args) -> (manifest text, [documents]); results cached for the session."""
    cache: dict[tuple[str, ...], tuple[str, list[dict]]] = {}

    def _render(*extra: str) -> tuple[str, list[dict]]:
        key = tuple(extra)
        if key not in cache:
            out = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds", *extra).stdout
            docs = [d for d in yaml.safe_load_all(out) if d]
            cache[key] = (out, docs)
        return cache[key]

    return _render


@pytest.fixture(scope="session")
def scenario(render):
    """scenario(name) -> [documents] of one of SCENARIOS."""

    def _scenario(name: str) -> list[dict]:
        return render(*SCENARIOS[name])[1]

    return _scenario


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def operator_container(docs: list[dict]) -> dict:
    pod = one(docs, "Deployment", FULLNAME)["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "operator")


def read_yaml(path: Path):
    return yaml.safe_load(path.read_text())
