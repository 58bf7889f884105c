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


_PROGRAMS: dict[str, object] = {}


def _program(rule: str):
    import celpy

    if rule not in _PROGRAMS:
        env = celpy.Environment()
        _PROGRAMS[rule] = env.program(env.compile(rule))
    return _PROGRAMS[rule]


def cel_refusals(schema: dict, value, path: str = "") -> list[tuple[str, dict]]:
    """(path, rule) of each x-kubernetes-validations rule of `schema` that refuses `value`, evaluated where
    the API server evaluates it: at each node of the schema a value is present for (each item of a list;
    a map as a whole), after defaulting (call apply_defaults first). `path` names the field refused:
    the rule's fieldPath appended to the path of the node it sits on ("spec.placement.tolerations[0].value",
    "metadata.name"). At the root, as in Kubernetes, `self.metadata` holds only name and generateName. A
    rule that cannot be evaluated refuses (the API server refuses what a rule errs on)."""
    import celpy

    out: list[tuple[str, dict]] = []
    rules = schema.get("x-kubernetes-validations") or []
    if rules:
        subject = value
        if path == "" and isinstance(value, dict) and isinstance(value.get("metadata"), dict):
            meta = {k: v for k, v in value["metadata"].items() if k in ("name", "generateName")}
            subject = {**value, "metadata": meta}
        for rule in rules:
            try:
                ok = bool(_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(subject)}))
            except celpy.CELEvalError:
                ok = False
            if not ok:
                out.append(((path + rule.get("fieldPath", "")).lstrip("."), rule))
    if isinstance(value, dict):
        for key, prop in (schema.get("properties") or {}).items():
            if key in value:
                out += cel_refusals(prop, value[key], f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            out += cel_refusals(schema["items"], item, f"{path}[{i}]")
    return out


def openapi_validator(schema: dict):
    """A JSON Schema validator of `schema` that reads `pattern` as the API server does: RE2 (Go's regexp),
    where `$` is the end of the text (Python's re also lets it match before a final newline)."""
    import jsonschema
    import re2

    def pattern(validator, patrn, instance, schema):
        if validator.is_type(instance, "string") and not re2.search(patrn, instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {patrn!r}")

    return jsonschema.validators.extend(jsonschema.Draft7Validator, {"pattern": pattern})(schema)
