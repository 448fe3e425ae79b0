"""The policy and its frozen reference as ``PreferenceModule`` options describe them (dropout, LoRA, meta-device
construction, gradient checkpointing). Loading one model by name lives in ``model_sources``."""

from __future__ import annotations

from typing import Any

from torch import nn

from sparsepo_lightning import meta_init as meta_init_lib
from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.model_sources import load_causal_lm


def load_policy_and_reference(
    model: str,
    reference: str | None,
    needs_reference: bool,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    lora: dict[str, Any] | None = None,
    meta_init: bool = False,
    disable_dropout: bool = True,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, nn.Module | None]:
    """The policy to train (in train mode) and its frozen reference (eval mode, no gradients), as
    ``PreferenceModule`` options describe them.

    Args:
        model: the policy's alias, folder or hub name.
        reference: the reference's; None means the same as ``model``.
        needs_reference: False for reference-free objectives (SimPO): no reference is loaded.
        lora: ``peft.LoraConfig`` arguments: the policy gets adapters and the reference is the policy with its
            adapters disabled (no separate reference is returned).
        meta_init: parameters on the meta device (``meta_init.py``), weights loaded later by ``load_weights``.
        disable_dropout: set every dropout of both models to 0 (before LoRA, whose dropout is its own option).
        attn_implementation: attention implementation of both models (``set_attention``); None keeps transformers'.

    Returns:
        ``(policy, reference)``; the policy is a ``peft.PeftModel`` with ``lora``; ``reference`` is None
        without ``needs_reference`` or with ``lora``.
    """
    if lora is not None and reference is not None:
        raise ConfigError("model.lora uses the policy with adapters disabled as the reference; a separate "
                         f"model.reference={reference!r} contradicts it. Fix: remove one of the two options.")
    load = meta_init_lib.empty_causal_lm if meta_init else load_causal_lm
    policy = load(model, dtype=dtype, trust_remote_code=trust_remote_code)
    frozen = None
    if needs_reference and lora is None:
        frozen = load_frozen(reference or model, dtype, trust_remote_code, meta_init, disable_dropout,
                             attn_implementation)
    set_attention(attn_implementation, policy)
    if disable_dropout:
        _disable_dropout(policy)
    if lora is not None:
        policy = with_lora(policy, lora)
        if meta_init:
            meta_init_lib.materialize_lora_adapters(policy)
    policy.train()  # from_pretrained returns eval mode; Lightning keeps modules in the mode they have
    return policy, frozen


def load_frozen_models(paths: dict[str, str] | None, dtype: str = "float32", trust_remote_code: bool = False,
                       meta_init: bool = False, disable_dropout: bool = True,
                       attn_implementation: str | None = None) -> nn.ModuleDict | None:
    """Extra frozen models by name (``PreferenceModule(frozen_models=...)``), loaded like the reference: eval mode,
    no gradients, never checkpointed, sharded like the reference under FSDP2."""
    if not paths:
        return None
    models = nn.ModuleDict()
    for name, path in paths.items():
        if not name.isidentifier():
            raise ConfigError(f"model.frozen_models: the name {name!r} must be a Python identifier (e.g. positive).")
        models[name] = load_frozen(path, dtype, trust_remote_code, meta_init, disable_dropout, attn_implementation)
    return models


def load_frozen(path: str, dtype: str = "float32", trust_remote_code: bool = False, meta_init: bool = False,
                disable_dropout: bool = True, attn_implementation: str | None = None) -> nn.Module:
    """One frozen causal LM (the reference, an extra frozen model): eval mode, no gradients, the run's attention
    implementation, dropout off with ``disable_dropout``; without weights (meta device) with ``meta_init``."""
    load = meta_init_lib.empty_causal_lm if meta_init else load_causal_lm
    model = load(path, dtype=dtype, trust_remote_code=trust_remote_code).requires_grad_(False).eval()
    set_attention(attn_implementation, model)
    if disable_dropout:
        _disable_dropout(model)
    return model


def set_attention(implementation: str | None, *models: nn.Module | None) -> None:
    """Switch each model's attention to ``implementation`` (``sdpa``, ``eager``, ``flex_attention``,
    ``flash_attention_2``...) through transformers' ``set_attn_implementation``; None leaves them as loaded.

    Raises:
        ConfigError: transformers refuses the implementation for a model (not installed, not supported).
    """
    if implementation is None:
        return
    for model in models:
        if model is None:
            continue
        try:
            model.set_attn_implementation(implementation)
        except (ValueError, ImportError) as e:
            raise ConfigError(f"model.attn_implementation={implementation!r}: {type(model).__name__} cannot use it "
                              f"({e}). Fix: sdpa or eager, or install what the message asks for.") from None


def with_lora(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    """``peft.get_peft_model`` with a causal-LM ``LoraConfig`` built from ``options`` (errors name the option)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("model.lora needs the `peft` package: pip install peft") from e
    try:
        config = LoraConfig(task_type="CAUSAL_LM", **options)
    except TypeError as e:
        raise ConfigError(f"model.lora={options}: {e}. Fix: use peft.LoraConfig argument names.") from None
    return get_peft_model(model, config)


def _disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def frozen_state_keys(policy: nn.Module, reference: nn.Module | None, lora: bool,
                      frozen_models: nn.Module | None = None) -> set[str]:
    """``PreferenceModule`` state-dict keys rebuilt from their source on load, hence never checkpointed: the
    reference (``reference.*``), the extra frozen models (``frozen_models.*``) and, with LoRA, the policy's frozen
    base weights (``policy.*`` not trainable)."""
    keys = {f"reference.{k}" for k in reference.state_dict()} if reference is not None else set()
    if frozen_models is not None:
        keys |= {f"frozen_models.{k}" for k in frozen_models.state_dict()}
    if lora:
        trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
        keys |= {f"policy.{k}" for k in policy.state_dict() if k not in trainable}
    return keys
