"""What the API server does to a custom resource before validating it, for tests that check the CRD."""
from __future__ import annotations

import copy


def apply_defaults(schema: dict, value):
    """Fill in the defaults of absent properties, recursively, as the API server does before CEL."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    out = dict(value)
    for key, prop in schema["properties"].items():
        if key not in out and "default" in prop:
            out[key] = copy.deepcopy(prop["default"])
        if key in out:
            out[key] = apply_defaults(prop, out[key])
    return out
