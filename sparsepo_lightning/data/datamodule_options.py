"""Checks of ``PreferenceDataModule``'s options that need no data, run when it is built."""

from __future__ import annotations

from typing import Any

from sparsepo_lightning.chat_templates import CHAT_TEMPLATES
from sparsepo_lightning.data.batching import check_batching
from sparsepo_lightning.data.collate import collate_pairs
from sparsepo_lightning.errors import ConfigError


def check_options(dm: Any) -> None:
    """Raise a ``ConfigError`` naming the option and the fix for settings of the data module ``dm`` that cannot
    work together."""
    if dm.train_file and dm.hub_dataset:
        raise ConfigError("data: set either train_file or hub_dataset, not both.")
    if not 0.0 <= dm.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={dm.val_fraction}: must be in [0, 1).")
    if dm.val_fraction > 0 and (dm.val_file or (dm.hub_dataset and dm.val_split)):
        raise ConfigError(
            f"data.val_fraction={dm.val_fraction} holds out part of train, but a validation source is also "
            "set (val_file, or hub_dataset with val_split). Fix: set val_fraction: 0, or remove val_file / "
            "set val_split: null."
        )
    if not 1 <= dm.max_prompt_length < dm.max_length:
        raise ConfigError(
            f"data.max_prompt_length={dm.max_prompt_length}, data.max_length={dm.max_length}: need "
            "1 <= max_prompt_length < max_length so every response keeps at least one token."
        )
    if dm.chat_template is not None and "{" not in dm.chat_template:
        raise ConfigError(
            f"data.chat_template={dm.chat_template!r} is neither a built-in name ({', '.join(CHAT_TEMPLATES)}) "
            "nor a Jinja template. Fix: use one of the names or paste the template string."
        )
    if dm.batch_size < 1:
        raise ConfigError(f"data.batch_size={dm.batch_size}: must be >= 1 (pairs per device).")
    if dm.max_train_samples is not None and dm.max_train_samples < 1:
        raise ConfigError(f"data.max_train_samples={dm.max_train_samples}: must be >= 1 or null.")
    check_prompt_variants(dm)
    check_batching(dm.layout, dm.max_tokens, dm.pack_length, dm.max_length,
                   paired=dm.collate_fn is collate_pairs)


def check_prompt_variants(dm: Any) -> None:
    """Prompt variants (``prompt_variants.py``) need paired data: raise a ``ConfigError`` otherwise."""
    variants = getattr(dm, "prompt_variants", None)
    if not variants:
        return
    if dm.collate_fn is not collate_pairs:
        raise ConfigError(f"data.prompt_variants ({', '.join(variants)}) are built for preference pairs, but "
                          f"{type(dm).__name__} serves other rows. Fix: use sparsepo_lightning.data."
                          "PreferenceDataModule, or a method that declares no prompt variants.")


def adopt_prompt_variants(dm: Any) -> None:
    """Add the prompt variants the trainer's method declares (``prompt_variants.declared_variants``) to
    ``dm.prompt_variants`` (part of the tokenised-cache key), then check them.

    Raises:
        ConfigError: ``data.prompt_variants`` gives one of the method's names another template, a template without
            one ``{prompt}``, or variants a data module of unpaired rows cannot carry.
    """
    from sparsepo_lightning.prompt_variants import check_templates, declared_variants

    trainer = getattr(dm, "trainer", None)
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    wanted = declared_variants(getattr(module, "objective", None), getattr(module, "masker", None))
    for name, template in wanted.items():
        mine = (dm.prompt_variants or {}).get(name, template)
        if mine != template:
            raise ConfigError(f"data.prompt_variants.{name}={mine!r} differs from the template the method declares "
                              f"({template!r}). Fix: set the template in the method's options only.")
    dm.prompt_variants = {**(dm.prompt_variants or {}), **wanted} or None
    check_prompt_variants(dm)
    if dm.prompt_variants:
        check_templates(dm.prompt_variants, "data.prompt_variants")
