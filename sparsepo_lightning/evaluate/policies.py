"""Load the models to evaluate: a model name/path, or a PreferenceModule Lightning checkpoint (``.ckpt``).

A checkpoint holds the trained policy but not the reference (``PreferenceModule.on_save_checkpoint``); with LoRA
it holds only the adapters and masks. The policy is rebuilt from ``hyper_parameters["model"]``, its ``policy.*``
weights are loaded with ``torch.load(weights_only=True)`` (no pickled code runs), and LoRA adapters are merged
into the base weights, so every command sees a plain Hugging Face causal LM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sparsepo_lightning.models import load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)

_POLICY_PREFIX = "policy."


@dataclass
class LoadedPolicy:
    """A causal LM ready for generation, with what is known about how it was trained."""

    label: str
    """Short name for tables and plots (the file stem of a checkpoint, else the name given)."""
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    reference: str | None
    """The reference it was trained against (checkpoints only; ``None`` for a plain model name)."""


def is_checkpoint(spec: str) -> bool:
    """True for a Lightning checkpoint file (``*.ckpt``)."""
    return spec.endswith(".ckpt")


def label_of(spec: str) -> str:
    """A short display name: ``runs/x/checkpoints/step=10.ckpt`` -> ``step=10``; model names are kept."""
    return Path(spec).stem if is_checkpoint(spec) else spec


def checkpoint_hparams(path: str | Path) -> dict[str, Any]:
    """The ``hyper_parameters`` of a PreferenceModule checkpoint (loaded with ``weights_only=True``)."""
    return dict(_read_checkpoint(path).get("hyper_parameters") or {})


def reference_name(spec: str) -> str | None:
    """The reference a checkpoint was trained against (``model.reference`` or ``model.model``); None otherwise."""
    if not is_checkpoint(spec):
        return None
    hparams = checkpoint_hparams(spec)
    return hparams.get("reference") or hparams.get("model")


def load_policy(spec: str, dtype: str = "float32", device: str = "cpu", label: str | None = None) -> LoadedPolicy:
    """Load a model name/path or a PreferenceModule checkpoint, in eval mode on ``device``.

    Raises:
        FileNotFoundError: a ``.ckpt`` path that does not exist.
        ValueError: a checkpoint that is not a PreferenceModule checkpoint, or whose weights do not fit the model.
    """
    if not is_checkpoint(spec):
        model = load_causal_lm(spec, dtype=dtype)
        tokenizer = load_tokenizer(spec)
        reference = None
    else:
        model, tokenizer_name, reference = _load_checkpoint_policy(spec, dtype)
        tokenizer = load_tokenizer(tokenizer_name)
    model.to(device).eval()
    return LoadedPolicy(label or label_of(spec), model, tokenizer, reference)


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist. Fix: check the path given to --policies.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types
        raise ValueError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {e}). Only "
            "PreferenceModule checkpoints written by `sparsepo fit` are supported."
        ) from e


def _load_checkpoint_policy(path: str, dtype: str) -> tuple[PreTrainedModel, str, str]:
    """Rebuild the policy of a PreferenceModule checkpoint; returns ``(model, tokenizer name, reference name)``."""
    checkpoint = _read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters") or {}
    if "model" not in hparams or "state_dict" not in checkpoint:
        raise ValueError(f"{path}: no hyper_parameters['model'] or state_dict; not a PreferenceModule checkpoint.")
    name = hparams["model"]
    state = {k[len(_POLICY_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(_POLICY_PREFIX)}
    model = load_causal_lm(name, dtype=dtype, trust_remote_code=bool(hparams.get("trust_remote_code", False)))
    if hparams.get("lora") is not None:
        model = _merged_lora(model, hparams["lora"], state, path)
    else:
        _load_strict(model, state, path)
    reference = hparams.get("reference") or name
    return model, hparams.get("tokenizer_name") or name, reference


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: the policy weights do not fit the model named in the checkpoint: {e}") from e


def _merged_lora(model: PreTrainedModel, options: dict[str, Any], state: dict[str, torch.Tensor], path: str):
    """Wrap ``model`` with the checkpoint's LoRA config, load the saved adapters, merge them into the weights."""
    from peft import LoraConfig, get_peft_model

    options = {k: v for k, v in options.items() if k != "task_type"}
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **options))
    result = peft_model.load_state_dict(state, strict=False)  # the frozen base weights are not in the checkpoint
    if result.unexpected_keys or not state:
        raise ValueError(
            f"{path}: the saved LoRA adapters do not fit a {options} LoRA on {type(model).__name__} "
            f"(unexpected keys: {result.unexpected_keys[:3]}, saved tensors: {len(state)})."
        )
    return peft_model.merge_and_unload()
