"""Prompt variants: extra renderings of each row's prompt that a method asks for (T-REG's contrastive prompts).

A masker or an objective declares ``prompt_variants() -> {name: template}``; a template is text with one ``{prompt}``
placeholder. The data module renders each variant prompt, tokenises it once with the rest of the row (cached; the
templates are part of the cache key) and each batch then carries, per variant, the 2B rows
``[variant prompt | same response tokens]`` (``PreferenceBatch.prompt_variants``). The module's step runs a model on
them without gradient and gives the method the per-token label log-probs aligned with the original response tokens
(``TokenStats.variant_logps``, shifted like every statistic). Which model scores them: the owner's
``prompt_variant_scorer()`` (``"reference"``: the frozen reference, T-REG's default; ``"policy"``: the current policy;
an owner without the method: the policy), see :func:`declared_scorers`. docs/treg.md shows the whole path.

Rendering: a plain-text prompt becomes ``template.replace("{prompt}", prompt)``; in a chat prompt the template is
applied to the content of the last user message (other messages unchanged), and the chat template renders the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sparsepo_lightning.errors import ConfigError

PLACEHOLDER = "{prompt}"
SCORERS = ("reference", "policy")
"""The models that can score a prompt variant's rows (no gradient in either case)."""


def check_templates(templates: Mapping[str, str], owner: str) -> None:
    """Raise a ``ConfigError`` naming ``owner`` for a template without exactly one ``{prompt}`` placeholder."""
    for name, template in templates.items():
        if not isinstance(template, str) or template.count(PLACEHOLDER) != 1:
            raise ConfigError(f"{owner}: the prompt variant {name!r} has template {template!r}; a template holds "
                              f"exactly one {PLACEHOLDER} where the row's prompt goes. Fix: e.g. "
                              f"'Answer helpfully.\\n\\n{PLACEHOLDER}'.")


def declared_variants(*owners: Any) -> dict[str, str]:
    """The prompt variants that an objective and a masker declare (``prompt_variants()``), merged by name.

    Raises:
        ConfigError: two owners declare one name with different templates.
    """
    merged: dict[str, str] = {}
    for owner in owners:
        declare = getattr(owner, "prompt_variants", None)
        for name, template in (declare() if callable(declare) else {}).items():
            if merged.get(name, template) != template:
                raise ConfigError(f"two parts of the run declare the prompt variant {name!r} with different "
                                  "templates; rename one.")
            merged[name] = template
    return merged


def declared_scorers(*owners: Any) -> dict[str, str]:
    """Per declared prompt variant, the model that scores its rows: the owner's ``prompt_variant_scorer()`` (one of
    :data:`SCORERS`), ``"policy"`` for an owner without that method.

    Raises:
        ConfigError: a scorer outside :data:`SCORERS`, or two owners declaring one name with different scorers.
    """
    merged: dict[str, str] = {}
    for owner in owners:
        declare = getattr(owner, "prompt_variants", None)
        choose = getattr(owner, "prompt_variant_scorer", None)
        scorer = choose() if callable(choose) else "policy"
        if scorer not in SCORERS:
            raise ConfigError(f"{type(owner).__name__}: prompt variants are scored by {scorer!r}; the choices are "
                              f"{', '.join(SCORERS)}. Fix: scorer: reference (or policy).")
        for name in (declare() if callable(declare) else {}):
            if merged.get(name, scorer) != scorer:
                raise ConfigError(f"two parts of the run score the prompt variant {name!r} with different models; "
                                  "rename one.")
            merged[name] = scorer
    return merged


def render_prompt(prompt: str | list[dict[str, str]], template: str) -> str | list[dict[str, str]]:
    """``prompt`` rendered with ``template``: a string directly, a chat prompt in its last user message.

    Example::

        render_prompt("2+2?", "Answer well.\\n\\n{prompt}")  ->  "Answer well.\\n\\n2+2?"
    """
    if isinstance(prompt, str):
        return template.replace(PLACEHOLDER, prompt)
    messages = [dict(m) for m in prompt]
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:  # no user turn (implicit prompt): the instruction becomes one
        return [*messages, {"role": "user", "content": template.replace(PLACEHOLDER, "").strip()}]
    last = messages[users[-1]]
    last["content"] = template.replace(PLACEHOLDER, last["content"])
    return messages
