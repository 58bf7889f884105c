"""units: the ground floor's quantities, durations and times; a Node's quantities read as the API server
writes them, held to kubernetes.utils.parse_quantity (the client's reading of apimachinery's grammar)."""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest
from kubernetes.utils import parse_quantity as kubernetes_parse_quantity

from llama_operator import units
from llama_operator.units import parse_duration, parse_quantity


# --- Durations and quantities --------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("500ms", 0.5), ("1.5s", 1.5), ("1m30s", 90.0), ("2m", 120.0), ("30ms", 0.03), ("1s500ms", 1.5),
])
def test_parse_duration_accepts_go_style_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["500 ms", "fast", "", "1h", "-1s", "1.s", "ms"])
def test_parse_duration_refuses_what_is_not_a_duration(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("value, n", [
    ("48Gi", 48 * 2**30), ("80G", 80 * 10**9), (1024, 1024), ("1024", 1024), ("1.5Gi", 3 * 2**29),
    ("512Mi", 512 * 2**20), ("2Ti", 2 * 2**40), ("100k", 100_000),
])
def test_parse_quantity_accepts_kubernetes_quantities(value, n):
    assert parse_quantity(value) == n


@pytest.mark.parametrize("value", ["lots", "48 GB", "48GiB", "-1Gi", "", True, 1.5, None])
def test_parse_quantity_refuses_what_is_not_a_quantity(value):
    with pytest.raises(ValueError, match="not a quantity"):
        parse_quantity(value)


def test_long_strings_do_not_reach_the_parse_caches():
    units._parse_quantity.cache_clear()
    units._parse_duration.cache_clear()
    for i in range(100):
        with pytest.raises(ValueError):
            parse_quantity(f"{i}" + "0" * 10_000)
        with pytest.raises(ValueError):
            parse_duration(f"{i}" + "0" * 10_000 + "s")
    assert units._parse_quantity.cache_info().currsize == 0
    assert units._parse_duration.cache_info().currsize == 0


def test_shown_values_are_short():
    bomb: list = ["lol"] * 9
    for _ in range(9):
        bomb = [bomb] * 9  # 9**10 strings when expanded
    for value in ("x" * 10**6, 10**5000, bomb, {"a": {"b": {"c": {"d": "e" * 10**6}}}}):
        assert len(units.shown(value)) < 400


# --- Quantities the API server writes --------------------------------------------------------------------

SERVER_QUANTITIES = ["16Gi", "16384Mi", "7910m", "32", "0.5", "1e9", "1E3", "2k", "100M", "1.5Gi", "250n",
                     "10u", "+3", "-2", ".5", "1.", "64Ki", "12E", "3Ei", "1e-3", 1024, 0.25]


@pytest.mark.parametrize("value", SERVER_QUANTITIES)
def test_a_server_quantity_reads_as_the_kubernetes_client_reads_it(value):
    assert units.quantity(value) == kubernetes_parse_quantity(value)


@pytest.mark.parametrize("value", ["lots", "16 Gi", "16GiB", "1ki", "Gi", "", "1e", "1e999999", "nan", "inf",
                                   "1_000", None, True, [1], {"a": 1}, "9" * 100])
def test_what_is_not_a_quantity_reads_as_none_without_raising(value):
    assert units.quantity(value) is None


def test_node_and_pod_quantities_become_bytes_and_millicores():
    assert units.quantity_bytes("1e9") == 10**9  # a spelling the hand-written parser used to read as 0
    assert units.quantity_bytes("16Gi") == 16 * 2**30 and units.quantity_bytes("2") == 2
    assert units.quantity_bytes("-1Gi") == 0
    assert units.quantity_millis("7910m") == 7910 and units.quantity_millis("32") == 32_000
    assert units.quantity_millis(0.5) == 500 and units.quantity_millis("1e1") == 10_000
    for bad in ("fast", "16 Gi", None):
        with pytest.raises(ValueError, match="not a Kubernetes quantity"):
            units.quantity_millis(bad)
        with pytest.raises(ValueError, match="not a Kubernetes quantity"):
            units.quantity_bytes(bad)


def test_two_spellings_of_one_amount_are_one_exact_value():
    assert units.quantity_exact("16Gi") == units.quantity_exact("16384Mi") == units.quantity_exact(str(16 * 2**30))
    assert units.quantity_exact("500m") == units.quantity_exact("0.5") == "0.5"
    assert units.quantity_exact("1e3") == units.quantity_exact("1k") == "1000"
    assert units.quantity_exact("not-a-quantity") == "not-a-quantity" and units.quantity_exact(None) is None


def test_times_are_written_and_read_as_kubernetes_writes_them():
    t = datetime(2026, 12, 6, 3, 4, 5, 678, tzinfo=timezone.utc)
    assert units.format_time(t) == "2026-12-06T03:04:05Z"
    assert units.parse_time("2026-12-06T03:04:05Z") == t.replace(microsecond=0)
    assert units.parse_time(units.utc_now()).tzinfo is timezone.utc
    assert isinstance(units.quantity("1"), Decimal)
