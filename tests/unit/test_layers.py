"""The package's shape (docs/architecture.md): every module in a layer, imports only downwards or within
its layer, no import cycles, no module over 500 lines, the core free of the kopf shell and the sandbox."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "llama_operator"

#: Bottom-up. A module may import its own layer and the layers below it, never one above.
LAYERS: list[tuple[str, set[str]]] = [
    ("ground floor", {"catalog", "units", "ownership"}),
    ("api and engine facts", {"api", "fields", "finetune", "speculation", "status", "engines", "crd", "reference"}),
    ("estimate", {"estimate", "prefill", "cpunode", "lora", "pipeline", "drafting"}),
    ("observation", {"observe"}),
    ("inventory", {"inventory"}),
    ("placement", {"placement"}),
    ("candidates", {"candidate"}),
    ("planner", {"planner", "ladder", "drafts", "multinode"}),
    ("SLO decisions", {"slo"}),
    ("render", {"render"}),
    ("reconcile decisions", {"reconcile"}),
    ("kopf shell", {"state", "handlers", "passes", "kube", "kubeclient", "live", "workqueue", "peering",
                    "metrics", "slo_metrics", "runner", "observer", "slo_watch"}),
    ("sandbox", {"sandbox"}),
    ("cli", {"cli", "loading", "slo_options", "plan_table"}),
]
MAX_MODULE_LINES = 500


def _modules() -> dict[str, Path]:
    """Dotted names below the package ('planner', 'render', 'sandbox.emulator') -> file."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts) or "__init__"] = path
    return out


def _top(dotted: str) -> str:
    return dotted.split(".")[0]


def _layer_of(dotted: str) -> int:
    top = _top(dotted)
    for i, (_, members) in enumerate(LAYERS):
        if top in members:
            return i
    raise AssertionError(f"llama_operator.{dotted} is in no layer: add it to LAYERS and docs/architecture.md")


def _imports(dotted: str, path: Path) -> set[str]:
    """Project modules `dotted` imports, anywhere in the file (function-local imports count)."""
    package = dotted.split(".") if path.name == "__init__.py" else dotted.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                if node.module is None:  # from . import api, planner
                    found.update(f"{target}.{a.name}".strip(".") for a in node.names)
                    continue
            elif node.module and node.module.startswith("llama_operator"):
                target = node.module.removeprefix("llama_operator").strip(".")
            else:
                continue
            if target:
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("llama_operator.") for a in node.names
                         if a.name.startswith("llama_operator."))
    return found


MODULES = _modules()


@pytest.mark.parametrize("dotted", sorted(MODULES))
def test_a_module_imports_only_its_layer_and_those_below(dotted):
    if dotted == "__init__":
        return
    mine = _layer_of(dotted)
    upward = sorted(t for t in _imports(dotted, MODULES[dotted]) if _layer_of(t) > mine)
    assert not upward, (f"llama_operator.{dotted} ({LAYERS[mine][0]}) imports {upward}, "
                        f"a layer above it")


@pytest.mark.parametrize("dotted", sorted(MODULES))
def test_no_module_holds_two_rooms(dotted):
    lines = len(MODULES[dotted].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"llama_operator.{dotted} has {lines} lines (at most {MAX_MODULE_LINES})"


def test_there_are_no_import_cycles():
    graph = {d: {t for t in _imports(d, p) if t in MODULES or _top(t) in MODULES} for d, p in MODULES.items()}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done or node not in graph:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check above can fail: a core module importing the shell is caught."""
    fake = tmp_path / "planner.py"
    fake.write_text("from .handlers import register\n")
    assert "handlers" in _imports("planner", fake)
    assert _layer_of("handlers") > _layer_of("planner")
