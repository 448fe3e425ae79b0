"""Meta-device initialisation: build a causal LM without weights, load them after FSDP2 has sharded it.

``PreferenceModule(meta_init=True)`` builds the policy and the reference with their parameters on the meta device
(no memory; buffers such as rotary frequencies are real, they are computed from the config), then
``configure_model`` shards them (``fully_shard`` works on meta parameters), allocates each rank's shards on its
device and fills them from the checkpoint's safetensors files. Every rank streams the files itself, one tensor at a
time (memory-mapped), and keeps only its own slice of each: no rank ever holds a full model, and nothing is
broadcast. Peak CPU memory per rank is its shards plus the largest single tensor (the embedding), instead of two
full models per rank. Without sharding (one device, DDP) the full weights are loaded into the allocated model.

Only safetensors checkpoints in a local folder (or the hub cache, see ``checkpoint_files``) are supported; other
formats fail with the fix (``model.meta_init: false`` loads through ``from_pretrained``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from sparsepo_lightning.model_sources import DTYPE_KWARG, as_dtype, resolve_model_path

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "base_layer.")
"""Name parts added by wrappers (FSDP1, activation checkpointing, peft's LoRA layer around the base Linear)."""


def empty_causal_lm(name: str, dtype: str | torch.dtype = "float32",
                    trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM ``name`` (alias, folder or hub name) with parameters on the meta device and real buffers.

    The checkpoint folder is remembered on the model (``model.name_or_path``) for ``load_weights``.
    """
    from accelerate import init_empty_weights  # the field's way to build a model without weights

    path = resolve_model_path(name)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                 **{DTYPE_KWARG: as_dtype(dtype)})
    model.tie_weights()  # init_empty_weights re-creates each parameter it registers, which unties a tied head
    model.name_or_path = path
    with contextlib.suppress(OSError):  # no generation_config.json: keep the one derived from the config
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def materialize_lora_adapters(peft_model: nn.Module) -> None:
    """Give the LoRA adapters of a ``peft`` model built on a meta-device base real (CPU) weights, initialised as
    its ``LoraConfig`` says; the base weights stay on meta for ``load_weights``, which keeps the adapters.

    Raises:
        ValueError: DoRA (``use_dora``), whose init reads the base weights.
    """
    from peft.tuners.lora import LoraLayer

    for adapter, config in peft_model.peft_config.items():
        if getattr(config, "use_dora", False):
            raise ValueError("model.lora.use_dora initialises from the base weights, which model.meta_init loads "
                             "later. Fix: set model.meta_init: false, or drop use_dora.")
        for layer in peft_model.modules():
            if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
                for container in layer.adapter_layer_names:
                    if adapter in getattr(layer, container):
                        getattr(layer, container)[adapter].to_empty(device="cpu")
                layer.reset_lora_parameters(adapter, config.init_lora_weights)


def has_meta_parameters(module: nn.Module) -> bool:
    """True while any parameter (or its local shard) is on the meta device."""
    return any(_local(p).is_meta for p in module.parameters())


def checkpoint_files(path: str) -> list[Path]:
    """The safetensors files of checkpoint ``path``: ``model.safetensors`` or the shards its index lists.

    A hub name is resolved to its local snapshot (downloaded once by ``huggingface_hub`` when not cached).

    Raises:
        FileNotFoundError: no safetensors weights there, with the fix.
    """
    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"]))
    index = folder / _SAFETENSORS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"{folder}: no model.safetensors or {_SAFETENSORS_INDEX}; meta-device loading reads safetensors only. "
        "Fix: convert the checkpoint (`save_pretrained(..., safe_serialization=True)`) or set model.meta_init: false."
    )


def load_weights(model: nn.Module, device: torch.device | str) -> None:
    """Allocate ``model``'s meta parameters on ``device`` and fill them from its checkpoint (``name_or_path``).

    Works on a plain module and on one sharded by ``fully_shard`` (each rank copies only its slice of each
    tensor). Tensors that are not on meta (buffers, LoRA adapters) keep their values; a LoRA-wrapped Linear
    (``q_proj.base_layer.weight``) is filled from the checkpoint's ``q_proj.weight``. A parameter missing from
    the checkpoint is an error; checkpoint tensors the model does not have (e.g. a tied ``lm_head.weight``, old
    GPT-2 attention-bias buffers) are ignored.

    Raises:
        KeyError: a parameter is not in the checkpoint (names the first ones and the checkpoint).
    """
    from safetensors import safe_open

    # to_empty re-allocates every tensor: keep what already has values (buffers, LoRA adapters) and put it back
    kept = {name: _local(t).detach().clone() for name, t in _named_tensors(model).items() if not _local(t).is_meta}
    remaining = {_unwrapped(name) for name, p in model.named_parameters() if _local(p).is_meta}
    model.to_empty(device=device)
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    if not sharded and hasattr(model, "tie_weights"):  # to_empty gives each alias its own tensor; FSDP2 keeps ties
        model.tie_weights()
    targets = _named_tensors(model)
    with torch.no_grad():
        for name, value in kept.items():
            _local(targets[name]).copy_(value)
    prefix = getattr(model, "base_model_prefix", "")
    for file in checkpoint_files(model.name_or_path):
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            for key in reader.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = key if key in targets else f"{prefix}.{key}" if f"{prefix}.{key}" in targets else None
                if name is None or name in kept:
                    continue
                _copy_into(targets[name], reader.get_tensor(key))
                remaining.discard(name)
    if remaining:
        shown = ", ".join(sorted(remaining)[:3])
        raise KeyError(f"{model.name_or_path}: no weights for {len(remaining)} parameters ({shown} ...). Fix: check "
                       "that the checkpoint matches its config, or set model.meta_init: false.")


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by their unwrapped names (every alias of a tied parameter included)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return {_unwrapped(name): tensor for name, tensor in named.items()}


def _unwrapped(name: str) -> str:
    for part in _WRAPPER_PREFIXES:
        name = name.replace(part, "")
    return name


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _copy_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full checkpoint tensor into ``target``: all of it, or this rank's slice of a sharded DTensor."""
    if tuple(full.shape) != tuple(target.shape):
        raise ValueError(f"checkpoint tensor of shape {tuple(full.shape)} does not fit a parameter of shape "
                         f"{tuple(target.shape)}. Fix: check that the checkpoint matches its config.")
    with torch.no_grad():
        if isinstance(target, DTensor):  # slice locally (src_data_rank=None): no communication, every rank has it
            full = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()
        _local(target).copy_(full)


def load_meta_weights(models: Iterable[nn.Module | None], device: torch.device | str) -> None:
    """``load_weights`` for each model that still has parameters on the meta device (``meta_init``)."""
    for model in models:
        if model is not None and has_meta_parameters(model):
            load_weights(model, device)
