"""Load the models to evaluate: a model name/path, or a PreferenceModule checkpoint written by ``sparsepo fit``.

A checkpoint is a Lightning ``.ckpt`` file or the sharded checkpoint folder of an FSDP2 or FSDP1 run; both are read by
:mod:`sparsepo_lightning.checkpoint_reading` (``weights_only``: no pickled code runs). It holds the trained policy
but not the reference; with LoRA only the adapters and masks. The policy is rebuilt from
``hyper_parameters["model"]`` and the saved weights, with LoRA adapters merged into the base weights, so every
command sees a plain Hugging Face causal LM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sparsepo_lightning.checkpoint_reading import (
    build_policy,
    checkpoint_step,
    is_checkpoint,
    read_checkpoint,
    read_hparams,
)
from sparsepo_lightning.model_sources import load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)

_OPTION = "the path given to --policies"


@dataclass
class LoadedPolicy:
    """A causal LM ready for generation, with what is known about how it was trained."""

    label: str
    """Short name for tables and plots (the file stem of a checkpoint, else the name given)."""
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    reference: str | None
    """The reference it was trained against (checkpoints only; ``None`` for a plain model name)."""


def label_of(spec: str) -> str:
    """A short display name: a checkpoint of a run (``runs/quickstart/version_0/checkpoints/last.ckpt``, file or
    FSDP folder) -> ``quickstart/version_0 @ step 70`` (the step saved in it); another checkpoint -> its file stem
    (``step=10``); model names are kept."""
    if not is_checkpoint(spec):
        return spec
    path = Path(spec)
    if path.parent.name != "checkpoints" or len(path.parents) < 3:
        return path.stem
    step = checkpoint_step(path)
    run = f"{path.parent.parent.parent.name}/{path.parent.parent.name}"
    return f"{run} @ step {step}" if step is not None else f"{run} {path.stem}"


def checkpoint_hparams(path: str | Path) -> dict[str, Any]:
    """The ``hyper_parameters`` of a PreferenceModule checkpoint (file or folder), without reading its weights."""
    return read_hparams(path, option=_OPTION)


def reference_name(spec: str) -> str | None:
    """The reference a checkpoint was trained against (``model.reference`` or ``model.model``); None otherwise."""
    if not is_checkpoint(spec):
        return None
    hparams = checkpoint_hparams(spec)
    return hparams.get("reference") or hparams.get("model")


def load_policy(spec: str, dtype: str = "float32", device: str = "cpu", label: str | None = None) -> LoadedPolicy:
    """Load a model name/path or a PreferenceModule checkpoint (``.ckpt`` or FSDP folder), in eval mode on ``device``.

    Raises:
        FileNotFoundError: a ``.ckpt`` path that does not exist.
        ValueError: a checkpoint that is not a PreferenceModule checkpoint, or whose weights do not fit the model.
    """
    if not is_checkpoint(spec):
        model = load_causal_lm(spec, dtype=dtype)
        tokenizer = load_tokenizer(spec)
        reference = None
    else:
        checkpoint = read_checkpoint(spec, option=_OPTION)
        model = build_policy(checkpoint, dtype)
        tokenizer = load_tokenizer(checkpoint.tokenizer_name)
        reference = checkpoint.reference_name
    model.to(device).eval()
    return LoadedPolicy(label or label_of(spec), model, tokenizer, reference)
