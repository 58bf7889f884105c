"""`llama-operator plan` on large and hostile input files: how long, how much memory.

    .venv/bin/python benchmarks/bench_cli_load.py [--nodes 10000] [--repeats 3] [--no-baseline]

Prints one JSON document on stdout. Not a test (tests/unit/test_cli.py and tests/reliability only check
that these files work or are refused): timings depend on the machine and its load.

* ``cluster``: a synthetic cluster of --nodes Nodes and their Pods (benchmarks/synthetic.py), written as
  a multi-document YAML file, as one `kind: List` (what `kubectl get nodes -o yaml` writes) and as JSON
  (`-o json`); for each, `plan -f examples/chat.yaml --cluster FILE` in a process of its own: wall time and
  peak resident memory (median of --repeats), and in this process the seconds spent reading the file
  (loading._load_documents) against PyYAML's pure-Python safe loader (what `plan` used before, the
  ``baseline``; skipped with --no-baseline: it takes minutes) and libyaml's CSafeLoader as PyYAML builds with
  it;
* ``alias_bomb``: a 700-byte "billion laughs" LlamaDeployment (9 levels of 9 aliases): `plan` in a process
  of its own, wall time, peak memory and the length of what it prints.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
import synthetic  # noqa: E402

from llama_operator import loading  # noqa: E402

CHAT = ROOT / "examples" / "chat.yaml"
# The CLI in a process of its own, printing its peak resident memory last (VmHWM: ru_maxrss would carry this
# process's own peak across fork and exec).
_RUN = """import re, sys
from llama_operator.cli import main
try:
    code = main(sys.argv[1:])
finally:
    with open("/proc/self/status") as f:
        sys.stderr.write("\\nPEAK_RSS_KIB=%s\\n" % re.search(r"VmHWM:\\s+(\\d+)", f.read()).group(1))
sys.exit(code)
"""


def run_cli(*argv) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RUN, *map(str, argv)], capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - started
    err, _, peak = proc.stderr.rpartition("\nPEAK_RSS_KIB=")
    return {"exit": proc.returncode, "seconds": round(seconds, 2), "peak_rss_mib": int(peak) // 1024,
            "stderr_chars": len(err.strip())}


def median_run(repeats: int, *argv) -> dict:
    runs = [run_cli(*argv) for _ in range(repeats)]
    return {"exit": runs[0]["exit"], "seconds_median": statistics.median(r["seconds"] for r in runs),
            "peak_rss_mib_median": statistics.median(r["peak_rss_mib"] for r in runs)}


def timed(fn) -> float:
    gc.collect()
    started = time.perf_counter()
    fn()
    return round(time.perf_counter() - started, 2)


def alias_bomb() -> str:
    lines = ["apiVersion: llama-operator.dev/v1alpha1", "kind: LlamaDeployment", "metadata: {name: bomb}", "spec:",
             "  slo: {ttftP95: 1s, tpotP95: 50ms}", "  memoryBudget: 40Gi",
             '  x0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"  x{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines + ["  model: *a8", ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true", help="skip PyYAML's pure-Python loader (minutes)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    nodes, pods = synthetic.cluster(args.nodes)
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        files["multi-document YAML"] = tmpdir / "cluster.yaml"
        files["multi-document YAML"].write_text(yaml.dump_all(nodes + pods, Dumper=dumper, sort_keys=False))
        files["List (kubectl get -o yaml)"] = tmpdir / "cluster-list.yaml"
        files["List (kubectl get -o yaml)"].write_text(
            yaml.dump({"apiVersion": "v1", "kind": "List", "items": nodes + pods}, Dumper=dumper, sort_keys=False))
        files["JSON (kubectl get -o json)"] = tmpdir / "cluster.json"
        files["JSON (kubectl get -o json)"].write_text(json.dumps({"apiVersion": "v1", "kind": "List",
                                                                   "items": nodes + pods}))
        cluster = []
        for label, path in files.items():
            text = path.read_text()
            entry = {"file": label, "megabytes": round(len(text) / 1e6, 1),
                     "plan": median_run(args.repeats, "plan", "-f", CHAT, "--cluster", path),
                     "read_seconds": timed(lambda: loading._load_documents(str(path), loading.MAX_CLUSTER_FILE_BYTES))}
            if hasattr(yaml, "CSafeLoader"):
                entry["read_seconds_pyyaml_csafeloader"] = timed(
                    lambda: list(yaml.load_all(text, Loader=yaml.CSafeLoader)))
            if not args.no_baseline and not label.startswith("JSON"):
                entry["read_seconds_baseline_pure_python"] = timed(lambda: list(yaml.safe_load_all(text)))
            cluster.append(entry)
        bomb = tmpdir / "bomb.yaml"
        bomb.write_text(alias_bomb())
        bomb_run = run_cli("plan", "-f", bomb, "--cluster", ROOT / "examples" / "clusters" / "a100.yaml")
    out = {
        **report.header("cli_load", libyaml=bool(getattr(yaml, "__with_libyaml__", False))),
        "nodes": len(nodes),
        "pods": len(pods),
        "cluster": cluster,
        "alias_bomb": {"bytes": len(alias_bomb()), "strings_when_expanded": 9**9, **bomb_run},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    return report.emit(out)


if __name__ == "__main__":
    sys.exit(main())
