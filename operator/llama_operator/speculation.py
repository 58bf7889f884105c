"""Speculative decoding in the API (`spec.speculative`): a small model of the same tokenizer drafts a few tokens,
the requested model checks them all in one step and keeps those it would have written itself. The answer is
the requested model's (lossless); time per output token drops where a decode step is bound by reading the
weights, at low concurrency. docs/speculative.md.

* `mode`: Auto (default) drafts when the requested variant misses its time-per-output-token target and a
  draft is predicted to gain enough at the planned concurrency; On drafts whenever a draft can be served;
  Off never drafts.
* `draftModel`: a catalog text model sharing the target's tokenizer and smaller than it; default the
  smallest such (Llama 3.2 1B for every Llama 3.1/3.3 target and for Llama 3.2 3B).
* `numSpeculativeTokens`: the draft length; unset, the planner picks the one predicted fastest.

The rules here name the field and the fix; crd.cel_rules states those CEL can (speculative_rules).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .catalog import Model, load_catalog, model_ids
from .fields import ApiModel

#: The spec (api.LlamaDeploymentSpec, which is made of this module's models and so cannot be imported here).
LlamaDeploymentSpec = Any

#: The longest draft the API takes: past a handful of tokens the chance that all are accepted is small and
#: every drafted token costs a draft step (docs/speculative.md shows the gain falling again).
MAX_SPECULATIVE_TOKENS = 16


class Speculative(ApiModel):
    """A draft model that proposes tokens for the requested model to verify (docs/speculative.md)."""

    mode: Literal["Auto", "On", "Off"] = Field(default="Auto", description=(
        "Auto: draft when the requested variant misses slo.tpotP95 and a draft is predicted to gain enough at "
        "slo.concurrency (a rung above quantization and smaller models: it changes no answer); the SLO loop "
        "turns it off when the acceptance it measures, or the load, says it does not pay. On: always draft. "
        "Off: never."))
    draftModel: Literal[tuple(model_ids())] | None = Field(  # type: ignore[valid-type]
        default=None, description=(
            "The draft, by catalog id: a text model sharing the requested model's tokenizer and smaller than it. "
            "Unset: the smallest such (llama-3.2-1b-instruct for Llama 3.1, 3.3 and 3.2 3B)."))
    numSpeculativeTokens: int | None = Field(default=None, ge=1, le=MAX_SPECULATIVE_TOKENS, description=(
        "Tokens drafted per step (vLLM num_speculative_tokens, llama.cpp --spec-draft-n-max). Unset: the "
        "planner picks the length predicted fastest."))


def draft_models(target: Model) -> list[Model]:
    """The catalog models that may draft for `target`, smallest first: text models sharing its tokenizer and
    smaller than it (newest first among equals)."""
    if target.tokenizer is None or target.capability != "text":
        return []
    out = [m for m in load_catalog().models.values()
           if m.capability == "text" and m.tokenizer == target.tokenizer
           and m.published_parameters < target.published_parameters]
    return sorted(out, key=lambda m: (m.published_parameters, -float(m.family)))


def chosen_draft(spec: LlamaDeploymentSpec, target: Model) -> Model | None:
    """The draft `spec` asks for on `target` (a rung of the ladder may be a smaller model than spec.model):
    spec.speculative.draftModel when it may draft for that target, else the smallest that may; None when
    none may, or when the mode is Off."""
    wanted = spec.speculative
    if wanted.mode == "Off":
        return None
    drafts = draft_models(target)
    if wanted.draftModel is not None:
        return next((m for m in drafts if m.id == wanted.draftModel), None)
    return drafts[0] if drafts else None


def speculative_problems(spec: LlamaDeploymentSpec) -> list[str]:
    """What is wrong with spec.speculative for spec.model, each naming the field and the fix."""
    wanted = spec.speculative
    catalog = load_catalog()
    target = catalog.model(spec.model)
    problems = []
    if wanted.draftModel is not None:
        draft = catalog.model(wanted.draftModel)
        drafts = [m.id for m in draft_models(target)]
        if target.capability != "text":
            problems.append(f"spec.speculative.draftModel: {spec.model} is a vision model, and vision models are not "
                            "drafted for; remove draftModel (or set mode Off)")
        elif draft.capability != "text" or draft.tokenizer is None:
            problems.append(f"spec.speculative.draftModel: {draft.id} is a vision model; a draft is a small text "
                            f"model ({_listed(drafts)})")
        elif draft.tokenizer != target.tokenizer:
            problems.append(f"spec.speculative.draftModel: {draft.id} does not share {spec.model}'s tokenizer; "
                            f"use one that does ({_listed(drafts)})")
        elif draft.published_parameters >= target.published_parameters:
            problems.append(f"spec.speculative.draftModel: {draft.id} is not smaller than {spec.model}, so drafting "
                            f"with it cannot be faster; use a smaller one ({_listed(drafts)})")
    if wanted.mode == "On" and not draft_models(target) and wanted.draftModel is None:
        why = "vision models are not drafted for" if target.capability != "text" else \
            "no smaller catalog model shares its tokenizer"
        problems.append(f"spec.speculative.mode: On, but {spec.model} has no draft ({why}); set mode Auto or Off")
    return problems


def _listed(ids: list[str]) -> str:
    return ", ".join(ids) if ids else "none in the catalog"


def speculative_rules() -> list[dict[str, str]]:
    """The rules on spec.speculative that CEL can state (speculative_problems has them all, with the fix)."""
    catalog = load_catalog()
    drafts = {m.id: [d.id for d in draft_models(m)] for m in catalog.models.values()}
    table = "{" + ", ".join(f"'{t}': [{', '.join(repr(d) for d in ds)}]" for t, ds in drafts.items()) + "}"
    drafted = "[" + ", ".join(repr(t) for t, ds in drafts.items() if ds) + "]"
    has_draft = "has(self.speculative) && has(self.speculative.draftModel)"
    return [
        {
            "rule": f"!({has_draft}) || self.speculative.draftModel in {table}[self.model]",
            "message": "speculative.draftModel must be a smaller text model sharing the model's tokenizer (e.g. "
                       "llama-3.2-1b-instruct for Llama 3.1 and 3.3); vision models are not drafted for",
            "fieldPath": ".speculative.draftModel",
            "reason": "FieldValueInvalid",
        },
        {
            "rule": f"!has(self.speculative) || !has(self.speculative.mode) || self.speculative.mode != 'On' || "
                    f"self.model in {drafted}",
            "message": "speculative.mode On needs a model with a draft (a Llama 3.1, 3.3 or 3.2 3B text model); set "
                       "mode Auto or Off",
            "fieldPath": ".speculative.mode",
            "reason": "FieldValueInvalid",
        },
    ]
