"""The alert rule file passes promtool, its unit tests pass, and every alert is tested and documented.

- `promtool check rules` parses the rule file: valid PromQL, valid templates, no duplicate names.
- `promtool test rules` runs tests/alerts/*.test.yaml (one test per file, promtool's output printed).
- Coverage: every alert in the rule file has a case that fires it, a case where it stays silent,
  proper labels/annotations, and a runbook section in docs/alerts.md that its runbook_url points at.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from kit.paths import ROOT
from kit.tools import require_tool

RULE_FILE = ROOT / "charts" / "llama-operator" / "files" / "prometheus-rules.yaml"
TEST_DIR = Path(__file__).resolve().parent
TEST_FILES = sorted(TEST_DIR.glob("*.test.yaml"))
ALERTS_DOC = ROOT / "docs" / "alerts.md"
SEVERITIES = {"critical", "warning", "info"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    # Always visible with -s, and in the failure report otherwise.
    print(f"$ {' '.join(cmd)}\n{result.stdout}{result.stderr}")
    return result


def _alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULE_FILE.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _load_tests() -> list[tuple[Path, dict]]:
    return [(path, yaml.safe_load(path.read_text())) for path in TEST_FILES]


def test_promtool_check_rules():
    promtool = require_tool("promtool")
    result = _run([promtool, "check", "rules", str(RULE_FILE)])
    assert result.returncode == 0, f"promtool check rules failed:\n{result.stdout}{result.stderr}"


def test_there_are_unit_test_files():
    assert TEST_FILES, "no tests/alerts/*.test.yaml"
    for path, doc in _load_tests():
        referenced = [(path.parent / f).resolve() for f in doc.get("rule_files", [])]
        assert RULE_FILE.resolve() in referenced, f"{path.name} does not load {RULE_FILE}"


@pytest.mark.parametrize("test_file", TEST_FILES, ids=[p.name for p in TEST_FILES])
def test_promtool_test_rules(test_file: Path):
    promtool = require_tool("promtool")
    result = _run([promtool, "test", "rules", str(test_file)])
    assert result.returncode == 0, f"promtool test rules {test_file.name} failed:\n{result.stdout}{result.stderr}"


def _series_deployments(group: dict) -> set[tuple[str, str]]:
    """(namespace, llamadeployment) pairs named by a test group's input series."""
    found = set()
    for series in group.get("input_series", []):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', series["series"]))
        if "llamadeployment" in labels:
            found.add((labels.get("namespace", ""), labels["llamadeployment"]))
    return found


def _coverage() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """alert name -> where it fires; alert name -> where it is proven silent."""
    fires: dict[str, list[str]] = {}
    silent: dict[str, list[str]] = {}
    for path, doc in _load_tests():
        for group in doc.get("tests", []):
            where = f"{path.name}: {group.get('name', '?')}"
            deployments = _series_deployments(group)
            for case in group.get("alert_rule_test", []) or []:
                name = case["alertname"]
                expected = case.get("exp_alerts") or []
                if not expected:
                    silent.setdefault(name, []).append(f"{where} @ {case['eval_time']}")
                    continue
                fires.setdefault(name, []).append(f"{where} @ {case['eval_time']}")
                # A firing case that lists only some of the group's deployments proves the others
                # silent at the same moment (promtool compares the complete list).
                alerted = {
                    (a["exp_labels"].get("namespace", ""), a["exp_labels"].get("llamadeployment"))
                    for a in expected
                }
                if deployments - alerted:
                    silent.setdefault(name, []).append(f"{where} @ {case['eval_time']} (other deployments)")
    return fires, silent


def test_every_alert_has_a_firing_and_a_silent_case():
    fires, silent = _coverage()
    names = [rule["alert"] for rule in _alert_rules()]
    assert names, "the rule file has no alerts"
    unknown = (set(fires) | set(silent)) - set(names)
    assert not unknown, f"tests name alerts the rule file does not define: {sorted(unknown)}"
    missing_fire = [n for n in names if n not in fires]
    missing_silent = [n for n in names if n not in silent]
    assert not missing_fire, f"alerts no test case fires: {missing_fire}"
    assert not missing_silent, f"alerts no test case proves silent: {missing_silent}"


def test_every_alert_has_severity_annotations_and_a_documented_runbook():
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", ALERTS_DOC.read_text(), flags=re.MULTILINE)
    anchors = {_github_anchor(h) for h in headings}
    problems = []
    for rule in _alert_rules():
        name = rule["alert"]
        severity = rule.get("labels", {}).get("severity")
        if severity not in SEVERITIES:
            problems.append(f"{name}: severity {severity!r} not in {sorted(SEVERITIES)}")
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not annotations.get(key):
                problems.append(f"{name}: no {key} annotation")
        url = annotations.get("runbook_url", "")
        path, _, anchor = url.partition("#")
        if not path.endswith("docs/alerts.md"):
            problems.append(f"{name}: runbook_url {url!r} does not point at docs/alerts.md")
        if anchor != _github_anchor(name):
            problems.append(f"{name}: runbook anchor {anchor!r} is not {_github_anchor(name)!r}")
        if anchor not in anchors:
            problems.append(f"{name}: docs/alerts.md has no section with anchor #{anchor}")
        if not rule.get("for"):
            problems.append(f"{name}: no `for:` (a single bad evaluation would page)")
    assert not problems, "\n".join(problems)


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lowercase, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")
