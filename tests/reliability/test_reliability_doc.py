"""docs/reliability.md is what the reliability tests produce: rendered (reliability_doc.py) from the rows
they record, re-rendered at the end of every session that ran them all.

These checks keep the committed copy honest: it lists exactly the cases the suite defines (every bad
input file, every fault, scenario and place searched for the token), each with its green outcome, and,
when this checkout has the rows of a full run, it is what that run rendered.
"""
from __future__ import annotations

import json

import pytest

import reliability_doc


def test_the_committed_doc_lists_every_case_green():
    expected = reliability_doc.render(reliability_doc.expected_rows())
    assert reliability_doc.DOC.exists(), "docs/reliability.md is missing: run .venv/bin/pytest tests/reliability"
    assert reliability_doc.DOC.read_text() == expected, (
        "docs/reliability.md does not list the suite's cases with green outcomes: a case was added, renamed "
        "or is failing. Run .venv/bin/pytest tests/reliability (it re-renders the doc) and look at the diff.")


def test_the_committed_doc_is_what_the_last_full_run_rendered():
    if not reliability_doc.LAST_RESULTS.exists():
        pytest.skip("no recorded run in this checkout (.pytest_cache/reliability-results.json)")
    rows = json.loads(reliability_doc.LAST_RESULTS.read_text())
    if not reliability_doc.complete(rows):
        pytest.skip("the last recorded run did not run every case")
    assert reliability_doc.DOC.read_text() == reliability_doc.render(rows)


def test_rendering_is_deterministic():
    rows = reliability_doc.expected_rows()
    text = reliability_doc.render(rows)
    assert text == reliability_doc.render(list(reversed(rows)))  # the order of recording does not matter
    assert "FAILED" not in text
