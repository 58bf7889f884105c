"""The ground floor's words: Kubernetes quantities, durations, and how bytes, seconds and times are written.

Every layer may import this module; it imports nothing of the project. Two readings of a quantity live
here, on purpose:

* `parse_quantity` reads what a *user* wrote in a LlamaDeployment (the CRD's narrower pattern, bytes as
  an integer, errors that name the fix);
* `quantity` reads what the *API server* wrote in a Node or Pod (any Kubernetes quantity: '7910m', '1e9',
  '16Gi', 0.5), the grammar of apimachinery's resource.Quantity as kubernetes.utils.parse_quantity reads it
  (tests/unit/test_units.py holds the two to the same values). That function is not called here because
  importing it loads the whole kubernetes client (~0.4 s), which `llama-operator plan` does not need.
"""
from __future__ import annotations

import functools
import re
import reprlib
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

# --- Messages ------------------------------------------------------------------------------------------

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 2, 3, 3, 3, 3
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 60, 40, 60


def shown(value: Any) -> str:
    """repr(value) for a message, cut short (a few levels, items and characters): a message never carries a
    user's megabyte string, nor the expansion of a YAML alias bomb."""
    if isinstance(value, int) and value.bit_length() > 1000:  # (repr of a 4300-digit int raises)
        return f"a {'negative ' if value < 0 else ''}number of more than 300 digits"
    text = _REPR.repr(value)
    if isinstance(value, str) and len(value) > _REPR.maxstring:
        text += f" ({len(value)} characters)"
    return text


def _within(text: str, limit: int, what: str, hint: str) -> str:
    """`text`, when it is no longer than its field allows; a longer one is refused before it reaches a parse
    cache."""
    if len(text) > limit:
        raise ValueError(f"{shown(text)} is too long for a {what} (at most {limit} characters){hint}")
    return text


# --- Durations -----------------------------------------------------------------------------------------

#: The longest duration written as a string ("1m30s500ms" is far shorter).
MAX_DURATION_LENGTH = 32
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m))+$"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}


def parse_duration(text: str) -> float:
    """'500ms' -> 0.5, '1.5s' -> 1.5, '1m30s' -> 90.0 (Go-style, the units ms, s and m)."""
    if not isinstance(text, str) or not re.fullmatch(DURATION_PATTERN, text[:MAX_DURATION_LENGTH + 1]):
        raise ValueError(f"{shown(text)} is not a duration: write a number with a unit, e.g. 500ms, 1.5s or 2m")
    return _parse_duration(_within(text, MAX_DURATION_LENGTH, "duration", ", e.g. 500ms, 1.5s or 2m"))


# The planner asks for a spec's SLO once per candidate. Only bounded strings reach the cache (at most
# 4096 x MAX_DURATION_LENGTH characters): a user's long string cannot pin memory here.
@functools.lru_cache(maxsize=4096)
def _parse_duration(text: str) -> float:
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))


# --- Quantities a user writes ----------------------------------------------------------------------------

#: The longest quantity written as a string ("1073741824" and "1.5Gi" are far shorter).
MAX_QUANTITY_LENGTH = 32
#: What Kubernetes' int64 quantities hold.
MAX_QUANTITY_BYTES = 2**63 - 1
QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"


def parse_quantity(value: str | int) -> int:
    """A Kubernetes quantity of bytes: '48Gi' -> 51539607552, '80G' -> 80e9, 1024 -> 1024.

    At most MAX_QUANTITY_BYTES (what Kubernetes' int64 quantities hold); a number beyond it is an error
    naming the limit, never an overflow further on."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a quantity")
    if isinstance(value, int):
        if value > MAX_QUANTITY_BYTES:
            raise ValueError(f"{shown(value)} is too large: at most {MAX_QUANTITY_BYTES} bytes (8Ei), "
                             "e.g. 48Gi or 80G")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{shown(value)} is not a quantity: write bytes with a suffix, e.g. 48Gi or 80G")
    return _parse_quantity(_within(value, MAX_QUANTITY_LENGTH, "quantity",
                                   ": write bytes with a suffix, e.g. 48Gi or 80G"))


# The planner asks for a spec's memory budget once per candidate. Only strings of at most
# MAX_QUANTITY_LENGTH characters reach the cache.
@functools.lru_cache(maxsize=4096)
def _parse_quantity(value: str) -> int:
    if not re.fullmatch(QUANTITY_PATTERN, value):
        raise ValueError(f"{shown(value)} is not a quantity: write bytes with a suffix, e.g. 48Gi or 80G")
    n = int(_quantity_text(value))
    if n > MAX_QUANTITY_BYTES:
        raise ValueError(f"{value!r} is too large: at most {MAX_QUANTITY_BYTES} bytes (8Ei), e.g. 48Gi or 80G")
    return n


# --- Quantities the API server writes ----------------------------------------------------------------------

#: apimachinery's quantity: a signed decimal number, then a binary suffix, a decimal suffix or an exponent.
_QUANTITY = re.compile(r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?:(Ki|Mi|Gi|Ti|Pi|Ei)|(n|u|m|k|M|G|T|P|E)|[eE]([+-]?[0-9]+))?")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL_EXPONENT = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
#: An exponent beyond this is no resource any node has; Decimal would take it, and its arithmetic with it.
_MAX_EXPONENT = 100


def quantity(value: Any) -> Decimal | None:
    """Any Kubernetes quantity ('7910m', '1e9', '16Gi', 32, 0.5) as an exact Decimal; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    text = str(value).strip()
    return _quantity_text(text) if len(text) <= 64 else None


def quantity_bytes(value: Any) -> int:
    """A memory or device quantity as a whole number ('16Gi', '1e9', '2'). A Node or Pod the API server wrote
    always holds quantities; a hand-written cluster file may not, and its reader names the object."""
    return _server_quantity(value, 1)


def quantity_millis(value: Any) -> int:
    """A CPU quantity in millicores ('32' -> 32000, '7910m' -> 7910, 0.5 -> 500)."""
    return _server_quantity(value, 1000)


def _server_quantity(value: Any, scale: int) -> int:
    if isinstance(value, str) and len(value) <= 64:  # every Node and Pod of a pass: cached whole
        return _server_quantity_text(value, scale)
    if type(value) is int:  # the readers' default for an absent resource
        return max(value, 0) * scale
    return _whole(quantity(value), value, scale)


@functools.lru_cache(maxsize=4096)
def _server_quantity_text(text: str, scale: int) -> int:
    return _whole(quantity(text), text, scale)


def _whole(q: Decimal | None, value: Any, scale: int) -> int:
    if q is None:
        raise ValueError(f"{shown(value)} is not a Kubernetes quantity (e.g. 16Gi, 7910m or 1e9)")
    return int(max(q, Decimal(0)) * scale)


@functools.lru_cache(maxsize=4096)
def _quantity_text(text: str) -> Decimal | None:
    m = _QUANTITY.fullmatch(text)
    if m is None:
        return None
    try:
        number = Decimal(m.group(1))
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        return None
    binary, decimal, exponent = m.group(2), m.group(3), m.group(4)
    if binary:
        return number * _BINARY[binary]
    if decimal:
        return number.scaleb(_DECIMAL_EXPONENT[decimal])
    if exponent:
        if abs(int(exponent)) > _MAX_EXPONENT:
            return None
        return number.scaleb(int(exponent))
    return number


def quantity_exact(value: Any) -> Any:
    """A quantity as an exact decimal string ('16Gi' and '17179869184' alike, '500m' and '0.5' alike), so
    two spellings of one amount compare equal; anything that is not a quantity as it is."""
    q = quantity(value)
    return value if q is None else format(q.normalize(), "f")


# --- Bytes, seconds and times as people read them --------------------------------------------------------


def format_bytes(n: float) -> str:
    """Bytes for people: GiB with one decimal above 1 GiB, MiB below."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB"


def format_seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f}ms" if s >= 0.01 else f"{s * 1000:.1f}ms"
    return f"{s:.2f}s"


#: Kubernetes' metav1.Time on the wire: RFC 3339 in UTC, whole seconds.
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def format_time(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime(TIME_FORMAT)


def parse_time(text: str) -> datetime:
    """A metav1.Time as the operator writes it (whole seconds, 'Z')."""
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=timezone.utc)


def utc_now() -> str:
    """Now, as a metav1.Time. Only the shell calls it: the core is handed its clock."""
    return format_time(datetime.now(timezone.utc))
