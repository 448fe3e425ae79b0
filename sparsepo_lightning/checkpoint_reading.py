"""Read what ``sparsepo fit`` trained, from either kind of training checkpoint, in one process.

- a Lightning checkpoint file (``.ckpt``): one ``torch.save`` dict with ``state_dict``, ``hyper_parameters``,
  optimizer states, ...; read with ``torch.load(weights_only=True, mmap=True)``, so no pickled code runs and
  the optimizer states are mapped, never read into memory;
- a distributed checkpoint folder written under ``ModelParallelStrategy`` (FSDP2) or ``FSDPStrategy`` (FSDP1,
  sharded): ``torch.distributed.checkpoint`` shards (``__<rank>_0.distcp`` + ``.metadata``) holding
  ``state_dict`` (FSDP1: ``model``) and ``optimizer_<i>``, plus Lightning's
  ``meta.pt`` with everything else (hyper-parameters, counters). Only the ``state_dict`` tensors are read, with
  the public ``torch.distributed.checkpoint.load(..., no_dist=True)`` into full tensors allocated from the
  metadata: no process group, no optimizer state. ``.metadata`` is a pickle; it is read with an unpickler that
  only accepts the checkpoint's own metadata classes (the ``weights_only`` rule of this project).

Both hold what ``PreferenceModule`` saves: ``policy.*`` (all policy weights, or only the LoRA adapters) and
``masker.*`` (the mask networks), never the reference (FSDP1 folders hold it; it is not read). `build_policy`
rebuilds the policy from ``hyper_parameters["model"]`` and these weights.
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from transformers import PreTrainedModel

from sparsepo_lightning.errors import ConfigError, MissingFileError
from sparsepo_lightning.model_sources import load_causal_lm

POLICY_PREFIX = "policy."
MASKER_PREFIX = "masker."
DCP_METADATA = ".metadata"
"""File that marks a ``torch.distributed.checkpoint`` folder."""
LIGHTNING_META = "meta.pt"
"""Lightning's non-tensor part of a distributed checkpoint (``lightning.fabric.utilities.load._METADATA_FILENAME``)."""
_MODEL_ROOTS = ("state_dict.", "model.")
"""Where the module's tensors sit in a distributed checkpoint: ``ModelParallelStrategy`` (FSDP2) saves them under
``state_dict``, ``FSDPStrategy`` (FSDP1, ``state_dict_type: sharded``) under ``model`` (with the frozen reference,
which is not read)."""
REFERENCE_PREFIX = "reference."


@dataclass
class TrainedCheckpoint:
    """The model part of a PreferenceModule checkpoint (no optimizer state)."""

    path: Path
    distributed: bool
    """True for a distributed (sharded) checkpoint folder, False for a ``.ckpt`` file."""
    hparams: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    """``policy.*`` and ``masker.*`` tensors as the module saved them (full, unsharded)."""
    global_step: int | None = None
    epoch: int | None = None

    @property
    def model_name(self) -> str:
        """The policy's base model (``model.model``)."""
        return self.hparams["model"]

    @property
    def reference_name(self) -> str:
        """The reference the policy was trained against (``model.reference``, default the base model)."""
        return self.hparams.get("reference") or self.model_name

    @property
    def tokenizer_name(self) -> str:
        return self.hparams.get("tokenizer_name") or self.model_name

    @property
    def lora(self) -> dict[str, Any] | None:
        """The ``peft.LoraConfig`` arguments of a LoRA run, else None."""
        return self.hparams.get("lora")

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The saved tensors under ``prefix`` (``POLICY_PREFIX``, ``MASKER_PREFIX``), with the prefix removed."""
        return {k[len(prefix) :]: v for k, v in self.state_dict.items() if k.startswith(prefix)}


def is_distributed_checkpoint(path: str | Path) -> bool:
    """True for a ``torch.distributed.checkpoint`` folder (it holds a ``.metadata`` file)."""
    return Path(path).is_dir() and (Path(path) / DCP_METADATA).is_file()


def is_checkpoint(spec: str | Path) -> bool:
    """True for a Lightning checkpoint: a ``*.ckpt`` path, or a distributed checkpoint folder."""
    return str(spec).endswith(".ckpt") or is_distributed_checkpoint(spec)


def checkpoint_step(path: str | Path, option: str = "the checkpoint path") -> int | None:
    """The ``global_step`` a checkpoint was saved at, without reading its tensors."""
    step = _read_meta(_existing(path, option)).get("global_step")
    return None if step is None else int(step)


def read_hparams(path: str | Path, option: str = "the checkpoint path") -> dict[str, Any]:
    """The ``hyper_parameters`` of a checkpoint, without reading its tensors (errors as `read_checkpoint`)."""
    return dict(_read_meta(_existing(path, option)).get("hyper_parameters") or {})


def read_checkpoint(path: str | Path, option: str = "the checkpoint path") -> TrainedCheckpoint:
    """Hyper-parameters and ``policy.*``/``masker.*`` tensors of a ``.ckpt`` file or distributed checkpoint folder.

    Args:
        path: the checkpoint.
        option: what the user gave the path as, for the error message (e.g. ``--policies``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: it is not a PreferenceModule checkpoint written by ``sparsepo fit`` (or cannot be read safely).
    """
    path = _existing(path, option)
    meta = _read_meta(path)
    distributed = path.is_dir()
    hparams = dict(meta.get("hyper_parameters") or {})
    state = _read_distributed_state(path) if distributed else meta.get("state_dict")
    if "model" not in hparams or not isinstance(state, dict) or not any(k.startswith(POLICY_PREFIX) for k in state):
        raise ConfigError(f"{path}: no hyper_parameters['model'] or no policy.* weights; not a PreferenceModule "
                         "checkpoint. Fix: give a checkpoint written by `sparsepo fit` (a .ckpt file, or the "
                         "sharded checkpoint folder of an FSDP2 or FSDP1 run).")  # fmt: skip
    state = {k: v for k, v in state.items() if k.startswith((POLICY_PREFIX, MASKER_PREFIX))}
    return TrainedCheckpoint(path, distributed, hparams, state, meta.get("global_step"), meta.get("epoch"))


def build_policy(checkpoint: TrainedCheckpoint, dtype: str = "float32", merge_lora: bool = True) -> nn.Module:
    """The trained policy in eval mode: the base model with the saved weights (``dtype``, e.g. ``"bfloat16"``).

    With LoRA the adapters are merged into the base weights (a plain ``PreTrainedModel``), or with
    ``merge_lora=False`` kept in a ``peft.PeftModel``.

    Raises:
        ValueError: the saved weights do not fit the model named in the checkpoint.
    """
    hparams = checkpoint.hparams
    model = load_causal_lm(checkpoint.model_name, dtype=dtype, trust_remote_code=bool(hparams.get("trust_remote_code")))
    state = checkpoint.tensors(POLICY_PREFIX)
    if checkpoint.lora is None:
        _load_strict(model, state, checkpoint)
        return model.eval()
    peft_model = _lora_policy(model, checkpoint.lora, state, checkpoint)
    return (peft_model.merge_and_unload() if merge_lora else peft_model).eval()


def _existing(path: str | Path, option: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"checkpoint {str(path)!r} does not exist. Fix: check {option}.")
    if path.is_dir() and not is_distributed_checkpoint(path):
        raise ConfigError(f"{path}: a folder without {DCP_METADATA}, so not a distributed checkpoint. Fix: give a "
                         ".ckpt file, or the folder `trainer.save_checkpoint` wrote under ModelParallelStrategy.")
    return path


def _read_meta(path: Path) -> dict[str, Any]:
    """The whole ``.ckpt`` dict (tensors memory-mapped), or the ``meta.pt`` of a distributed checkpoint."""
    file = path / LIGHTNING_META if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path}: no {LIGHTNING_META}; a distributed checkpoint not written by Lightning "
                         "(`trainer.save_checkpoint` under ModelParallelStrategy) is not supported.")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle and zip errors come in many types
        raise ValueError(
            f"{file}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {e}). Only "
            "PreferenceModule checkpoints written by `sparsepo fit` are supported."
        ) from e
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{file}: holds a {type(checkpoint).__name__}, not a Lightning checkpoint dict.")
    return checkpoint


def _read_distributed_state(path: Path) -> dict[str, torch.Tensor]:
    """The full ``state_dict.*`` tensors of a distributed checkpoint (all shards joined), in this process."""
    reader = _SafeMetadataReader(path)
    try:
        entries = reader.read_metadata().state_dict_metadata
    except (pickle.UnpicklingError, EOFError, AttributeError) as e:
        raise ValueError(f"{path / DCP_METADATA}: not a readable torch.distributed.checkpoint metadata file ({e}). "
                         "Fix: give the folder `trainer.save_checkpoint` wrote under ModelParallelStrategy.") from e
    root = next((r for r in _MODEL_ROOTS if any(key.startswith(r) for key in entries)), _MODEL_ROOTS[0])
    state = {key: torch.empty(md.size, dtype=md.properties.dtype) for key, md in entries.items()
             if key.startswith(root) and isinstance(md, TensorStorageMetadata)
             and not key.startswith(f"{root}{REFERENCE_PREFIX}")}  # fmt: skip
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process")
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {k[len(root) :]: v for k, v in state.items()}


class _SafeMetadataReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` pickle may only build DCP metadata classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(Path(self.path) / DCP_METADATA, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as FileSystemReader.read_metadata does
        return metadata


class _MetadataUnpickler(pickle.Unpickler):
    """Accepts only what ``torch.distributed.checkpoint`` writes into ``.metadata``; anything else is refused."""

    _ALLOWED = {
        "torch.distributed.checkpoint.metadata": None,  # its dataclasses and enums
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},  # turns "torch.strided" into the layout object
        "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if module in self._ALLOWED:
            names, found = self._ALLOWED[module], super().find_class(module, name)
            if name in names if names is not None else isinstance(found, type):
                return found
        raise pickle.UnpicklingError(f"distributed checkpoint metadata refers to {module}.{name}, which a "
                                     "torch.distributed.checkpoint .metadata file never holds; refusing to load it.")


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], checkpoint: TrainedCheckpoint) -> None:
    """Load every policy weight; a key missing only because its weight is tied to a loaded one is fine."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise _misfit(checkpoint, str(e)) from e
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    missing = [k for k in result.missing_keys if not (k in params and id(params[k]) in loaded)]
    if missing or result.unexpected_keys:
        raise _misfit(checkpoint, f"missing keys {missing[:3]}, unexpected keys {result.unexpected_keys[:3]}")


def _lora_policy(model: PreTrainedModel, options: dict[str, Any], state: dict[str, torch.Tensor],
                 checkpoint: TrainedCheckpoint) -> nn.Module:
    """Wrap ``model`` with the checkpoint's LoRA config and load the saved adapters (the base stays as loaded)."""
    from peft import LoraConfig, get_peft_model

    options = {k: v for k, v in options.items() if k != "task_type"}
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **options))
    result = peft_model.load_state_dict(state, strict=False)  # the frozen base weights are not in the checkpoint
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing or not state:
        raise _misfit(checkpoint, f"with LoRA {options}: unexpected keys {result.unexpected_keys[:3]}, missing "
                                  f"adapter keys {missing[:3]}, saved tensors {len(state)}")  # fmt: skip
    return peft_model


def _misfit(checkpoint: TrainedCheckpoint, detail: str) -> ValueError:
    return ValueError(
        f"{checkpoint.path}: the saved policy weights do not fit the model named in the checkpoint "
        f"({checkpoint.model_name!r}): {detail.rstrip('.')}. Fix: hyper_parameters['model'] must still point to the "
        "base model the run trained (same architecture and size); a moved or replaced model folder breaks this."
    )
