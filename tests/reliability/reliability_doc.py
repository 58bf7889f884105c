"""Renders docs/reliability.md from the rows the reliability tests record.

The tests record one row per case (tests/reliability/conftest.py keeps them); at the end of a session
that ran every case, the doc is written again from them. Run by hand to re-render from the last run:

    .venv/bin/python tests/reliability/reliability_doc.py

tests/reliability/test_reliability_doc.py checks that the committed doc lists exactly the cases the
suite defines, each with its green outcome.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import reliability_cases as cases

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"
LAST_RESULTS = ROOT / ".pytest_cache" / "reliability-results.json"

# table id -> (title, what it shows, [(cell key, column header)])
TABLES = {
    "bad-input": ("Bad input", "Each file of `tests/reliability/bad_inputs/` (its comment says what is wrong). "
                  "*Caught by* is checked against the generated CRD (jsonschema for the OpenAPI schema, cel-python "
                  "for the CEL rules, after defaulting); *Operator* is what the operator did when the emulator, "
                  "which validates nothing, stored the object anyway.",
                  [("input", "Input"), ("wrong", "What is wrong"), ("caught_by", "Caught by"),
                   ("operator", "Operator")]),
    "cli-input": ("`plan` and `render` input files", "What `llama-operator plan` and `render` do with hostile or "
                  "huge files, each run as a process of its own (both commands where they apply); a bad input exits "
                  "1 with a message, never a traceback.",
                  [("input", "Input"), ("outcome", "Outcome")]),
    "api-faults": ("API faults on every write", "Each write the operator makes, failed twice (once for 429) while a "
                   "LlamaDeployment (with a model-cache claim) is created, updated (model and replicas) and "
                   "deleted. *Converged* means: Ready for the last generation, and the Deployment, Service, claim, "
                   "status and the operator's Events equal those of the same run without faults; after the delete, "
                   "nothing of it is left.",
                   [("fault", "Fault"), ("request", "Request"), ("outcome", "Outcome")]),
    "watch-faults": ("Watch faults", "The operator's open watches are cut, and the next watch request of the "
                     "resource gets the fault, while the same create, update and delete run.",
                     [("fault", "Fault"), ("watch", "Watch of"), ("outcome", "Outcome")]),
    "guards": ("Objects of the same name, hand edits and refusals",
               "What the operator does with objects it does not own, with edits of the objects it does own, and with "
               "what the API server refuses, for a LlamaDeployment (Llama 3.1 8B) created beside them. The emulator "
               "refuses names, labels and selectors as a real API server does, defaults and canonicalises fields, "
               "and runs the admission checks a test adds; a simulated kubelet stands in for Pod Security "
               "admission.",
               [("kind", "Case"), ("what", "What was done"), ("outcome", "Operator")]),
    "outage-restarts": ("Outage, restarts and peering", "",
                        [("scenario", "Scenario"), ("outcome", "Outcome")]),
    "secrets": ("Secrets", "A Secret holds a recognisable Hugging Face token; a LlamaDeployment references it and "
                "runs through create, update and an invalid edit.",
                [("where", "Searched"), ("outcome", "Outcome")]),
}


def expected_rows() -> list[dict]:
    """The rows of a run where everything passed."""
    rows = []
    for b in cases.bad_inputs():
        rows.append({"table": "bad-input", "key": b.key, "input": f"`{b.path.name}`", "wrong": b.wrong,
                     "caught_by": cases.CAUGHT_BY[b.caught_by], "operator": cases.bad_input_answer(b)})
    for key, (what, outcome) in cases.CLI_INPUTS.items():
        rows.append({"table": "cli-input", "key": key, "input": what, "outcome": outcome})
    for c in cases.FAULT_CASES:
        rows.append({"table": "api-faults", "key": c.id, "fault": c.kind.label, "request": c.target.label,
                     "outcome": cases.CONVERGED})
    for w in cases.WATCH_CASES:
        rows.append({"table": "watch-faults", "key": w.id, "fault": w.label, "watch": w.plural,
                     "outcome": cases.CONVERGED})
    for g in cases.GUARD_CASES:
        rows.append({"table": "guards", "key": g.key, "kind": g.kind, "what": g.what, "outcome": g.outcome})
    for key, (scenario, outcome) in cases.SCENARIOS.items():
        rows.append({"table": "outage-restarts", "key": key, "scenario": scenario, "outcome": outcome})
    for key, where in cases.SECRETS.items():
        rows.append({"table": "secrets", "key": key, "where": where, "outcome": cases.SECRET_ABSENT})
    return rows


def _order() -> dict[tuple[str, str], int]:
    return {(r["table"], r["key"]): i for i, r in enumerate(expected_rows())}


def complete(rows: list[dict]) -> bool:
    have = {(r["table"], r["key"]) for r in rows}
    return set(_order()) <= have


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(rows: list[dict]) -> str:
    order = _order()
    known = sorted((r for r in rows if (r["table"], r["key"]) in order), key=lambda r: order[(r["table"], r["key"])])
    failed = [r for r in known if any(str(v).startswith("FAILED") for v in r.values())]
    out = [
        "# Reliability",
        "",
        "<!-- Generated by tests/reliability (reliability_doc.py) from the rows the tests recorded. Do not edit. -->",
        "",
        "What the operator does with bad input, API faults, an API outage, restarts and a second replica, as "
        "tried by `tests/reliability/` against the API emulator (`llama_operator.sandbox.emulator` with fault injection, "
        "see `tests/reliability/reliability_harness.py`). Each row is one test case; the table is rendered from "
        "what the tests recorded, so it only says what was checked.",
        "",
        f"**{len(known) - len(failed)} of {len(known)} cases green.**" if not failed else
        f"**{len(failed)} of {len(known)} cases FAILED.**",
        "",
        "How faults are injected: a fault matches requests by verb, resource, subresource, namespace and the port "
        "they came in on (the operator has a port of its own), and either refuses the request before it is "
        "applied, or applies it and answers with the error (the answer is lost). A hang holds the request until "
        "released. The outage closes the operator's port and reopens it 30 s later. Memory and long-run "
        "behaviour are measured by `benchmarks/soak.py` (not part of the test run).",
        "",
    ]
    for table, (title, intro, columns) in TABLES.items():
        mine = [r for r in known if r["table"] == table]
        out += [f"## {title}", ""]
        if intro:
            out += [intro, ""]
        out.append("| " + " | ".join(h for _, h in columns) + " |")
        out.append("|" + "|".join("---" for _ in columns) + "|")
        for r in mine:
            out.append("| " + " | ".join(_cell(r.get(k, "")) for k, _ in columns) + " |")
        out.append("")
    out += [
        "## Reliability rules in the operator",
        "",
        "- Every request the operator's writer sends has a deadline (5 s to connect, 30 s to answer), and a "
        "transient failure (429 with its Retry-After, 5xx, a dropped connection, a conflict on a patch) is retried "
        "up to 3 times with a short backoff; after that the pass fails and is retried with a backoff that doubles "
        "up to `max_error_backoff_seconds`, reset by a good pass.",
        "- Writes are idempotent: a create answered 409 compares the live object instead; patches carry the "
        "whole wanted state; Events are named after the transition they report (object uid, the status the pass "
        "started from, the event), posted before the status that records the transition, and a 409 on an Event "
        "counts as posted. A retried or restarted pass therefore neither loses nor doubles an Event.",
        "- A spec the checks cannot read, even through a bug in them, is reported as Invalid (naming the field "
        "where it can) instead of failing every pass.",
        "- An invalid or unschedulable LlamaDeployment gets one status write and one Warning Event per generation; "
        "later passes write nothing.",
        "- The operator patches only objects whose controller ownerReference is the LlamaDeployment; another owner's "
        "object of the same name is a conflict, reported once and never changed.",
        "- Owned objects are compared with their render by content (server defaults and canonical quantities taken "
        "out), so a hand edit is written back while an unchanged object costs no write.",
        "- A write the API server refuses for good (4xx other than 401, 404, 409, 429) is reported once (status and "
        "one Warning Event, one log line, no traceback) and not sent again before the spec or plan changes or the "
        "resync period has passed.",
        "",
    ]
    return "\n".join(out)


def write(rows: list[dict]) -> bool:
    text = render(rows)
    if DOC.exists() and DOC.read_text() == text:
        return False
    DOC.write_text(text)
    return True


if __name__ == "__main__":
    if not LAST_RESULTS.exists():
        sys.exit(f"no results at {LAST_RESULTS}: run .venv/bin/pytest tests/reliability first")
    rows = json.loads(LAST_RESULTS.read_text())
    if not complete(rows):
        sys.exit("the last run did not record every case; run the whole of tests/reliability")
    print(f"{'wrote' if write(rows) else 'unchanged:'} {DOC}")
