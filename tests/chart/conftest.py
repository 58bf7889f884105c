"""The chart tests' fixtures live in chartkit.py (a uniquely named module the tests import helpers from)."""
from chartkit import helm, render, scenario  # noqa: F401  (pytest fixtures)
