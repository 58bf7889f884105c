"""What the sandbox's demo prints, and how it waits: the bundled examples and how it names them, what `kubectl get
llamadeployments` and the rendered workloads would show, the Events of some reasons, and the `kubectl apply` of
example files (Nodes, LlamaDeployments) through the dynamic client."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import yaml

from ..api import KIND
from ..catalog import GPU_RESOURCES

#: The example LlamaDeployments and clusters the sandbox uses by default: package data, so an installed
#: package has them too (the repository's top-level examples/ links to these files).
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def display_path(path: Path) -> str:
    """How the sandbox names a file it read: a bundled example by its place among the examples."""
    try:
        return f"examples/{path.resolve().relative_to(EXAMPLES).as_posix()}"
    except ValueError:
        return str(path)


def printer_table(items: list[dict]) -> str:
    """What `kubectl get llamadeployments` prints (the CRD's printer columns; kubectl shows a field that is not
    set as <none>)."""
    rows = [("NAME", "MODEL", "VARIANT", "RUNTIME", "READY", "ADAPTERS", "PHASE")]
    for item in sorted(items, key=lambda i: i["metadata"]["name"]):
        st = item.get("status") or {}
        cells = [st.get(key) for key in ("variant", "runtime", "ready", "adapterCount", "phase")]
        rows.append((item["metadata"]["name"], item["spec"]["model"],
                     *("<none>" if cell is None else str(cell) for cell in cells)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def workload_summary(deployments: list[dict]) -> str:
    lines = []
    for d in sorted(deployments, key=lambda x: x["metadata"]["name"]):
        c = d["spec"]["template"]["spec"]["containers"][0]
        limits = (c.get("resources") or {}).get("limits") or {}
        gpus = next((f"{v} {k}" for k, v in limits.items() if k in GPU_RESOURCES), "no GPU")
        lines.append(f"{d['metadata']['name']}: {c['image']} ({gpus})")
        args = c.get("args") or []
        pairs = []
        i = 0
        while i < len(args):
            if i + 1 < len(args) and not str(args[i + 1]).startswith("--"):
                pairs.append(f"{args[i]} {args[i + 1]}")
                i += 2
            else:
                pairs.append(str(args[i]))
                i += 1
        lines.append("    " + " ".join([*(c.get("command") or []), *pairs]))
    return "\n".join(lines)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll `predicate` every `interval` seconds until it is true or `timeout` has passed; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    out = []
    for d in docs:
        out.extend(d["items"] if d.get("kind", "").endswith("List") else [d])
    return out


def events(api, reasons: tuple[str, ...]) -> list[str]:
    evs = api.resources.get(api_version="v1", kind="Event").get().to_dict()["items"]
    evs.sort(key=lambda e: (e.get("metadata") or {}).get("resourceVersion", "0").zfill(20))
    return [f"  {e['involvedObject']['name']}: {e['reason']}: {e['message']}" for e in evs
            if e.get("reason") in reasons]


def create_nodes(node_res, path: Path) -> list[dict]:
    nodes = [d for d in load_docs(path) if d.get("kind") == "Node"]
    for n in nodes:
        node_res.create(body={k: v for k, v in n.items() if k != "metadata"} | {
            "metadata": {k: v for k, v in n["metadata"].items() if k in ("name", "labels", "annotations")}})
    return nodes


def apply_file(ld_res, path: Path) -> set[str]:
    """Create every LlamaDeployment of a file (as `kubectl apply -f`); their names."""
    names = set()
    for doc in load_docs(path):
        if doc.get("kind") == KIND:
            ld_res.create(body=doc, namespace=doc["metadata"].get("namespace", "default"))
            names.add(doc["metadata"]["name"])
    return names
