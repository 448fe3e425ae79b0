"""FSDP2 (``fully_shard``) layout of policy, reference and mask networks, for Lightning's ``ModelParallelStrategy``.

Layout of each Hugging Face causal LM (policy and reference), applied in ``PreferenceModule.configure_model``:

1. every decoder block is its own FSDP group (all-gathered just before it runs, freed after);
2. the output head is its own group, with the input embedding when the two are tied (one shared weight may
   belong to one group only). ``logprobs.token_stats`` calls the head directly on hidden states, chunk by
   chunk, outside the model's forward: a group of its own makes each such call all-gather the head weight
   through the head module's forward hooks (FSDP2's "chunked loss" grouping, ``fully_shard([.., head])``);
3. the decoder body (``model.base_model``, which ``logprobs.final_hidden_states`` calls) is the root: the
   embedding (if untied) and the final norm. ``base_model`` rather than the ``*ForCausalLM`` wrapper is the
   root because the wrapper's ``forward`` (which would compute all logits) is never called.

The mask networks get one group of their own (their parameters are sharded like the policy's, so their
gradients are reduce-scattered: a parameter outside every group would get no gradient reduction and the
ranks would drift apart silently). ``check_all_sharded`` enforces this.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from sparsepo_lightning.blocks import decoder_blocks


def checkpoint_blocks(model: nn.Module) -> int:
    """Wrap every decoder block of ``model`` in a non-reentrant activation-checkpoint wrapper (in place).

    Must run before ``fully_shard`` so each block's FSDP hooks sit outside the recomputed region. State-dict
    keys are unchanged (the wrapper strips its ``_checkpoint_wrapped_module.`` prefix). Returns the count.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        CheckpointWrapper,
        checkpoint_wrapper,
    )

    blocks = {id(block) for block in decoder_blocks(model)}
    wrapped = 0
    for parent in list(model.modules()):
        if isinstance(parent, CheckpointWrapper):
            continue
        for name, child in list(parent.named_children()):
            if id(child) not in blocks:
                continue
            setattr(parent, name, checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
            wrapped += 1
    return wrapped


def shard_causal_lm(model: nn.Module, mesh: DeviceMesh, mp_policy: Any = None,
                    reshard_root_after_forward: bool | None = None) -> None:
    """``fully_shard`` each decoder block, the output head (with the tied embedding), then ``base_model`` (root).

    Args:
        model: a HF causal LM (``get_input_embeddings``/``get_output_embeddings``/``base_model``).
        mesh: 1-D data-parallel device mesh the parameters are sharded over.
        mp_policy: an FSDP2 ``MixedPrecisionPolicy`` or None (parameters used in their own dtype).
        reshard_root_after_forward: free the root's parameters after forward (True for the frozen reference,
            which has no backward); None keeps them for the backward (FSDP's default for a root).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for block in decoder_blocks(model):  # a checkpointed block is sharded through its wrapper (hooks outside)
        fully_shard(_outermost(model, block), reshard_after_forward=True, **kwargs)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    if head is not None:
        fully_shard([embedding, head] if tied else head, reshard_after_forward=True, **kwargs)
    fully_shard(model.base_model, reshard_after_forward=reshard_root_after_forward, **kwargs)
    _keep_output_capture(model)


def shard_preference_models(policy: nn.Module, reference: nn.Module | None, masker: nn.Module | None,
                            mesh: DeviceMesh, param_dtype: str | None, frozen: Sequence[nn.Module] = ()) -> None:
    """The layout of the module docstring: policy and reference per block, head and body, the masker as one group.

    Args:
        policy: the policy's HF causal LM (inside the PeftModel with LoRA).
        reference: the separate frozen reference, or None; its root is resharded after forward (no backward).
        masker: the token masker; sharded when it has parameters (learned masks).
        mesh: Lightning's device mesh; its ``data_parallel`` dimension is used.
        param_dtype: compute dtype (``"bfloat16"``) with float32 gradient reduction, or None.
        frozen: extra frozen models (``PreferenceModule(frozen_models=...)``), sharded like the reference.

    Raises:
        ValueError: a tensor-parallel dimension larger than 1 (not supported), with the fix.
    """
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError("PreferenceModule shards over data_parallel only. Fix: ModelParallelStrategy("
                         "tensor_parallel_size=1, data_parallel_size=<number of GPUs>).")
    if "data_parallel" in names:
        mesh = mesh["data_parallel"]
    mp_policy = mixed_precision(param_dtype)
    shard_causal_lm(policy, mesh, mp_policy)
    for model in (reference, *frozen):
        if model is not None:
            shard_causal_lm(model, mesh, mp_policy, reshard_root_after_forward=True)
    if masker is not None and any(True for _ in masker.parameters()):
        shard_module(masker, mesh)


def _keep_output_capture(model: nn.Module) -> None:
    """Re-register HF output capture (``output_hidden_states``) for the classes ``fully_shard`` swapped in.

    transformers >= 5 records per-layer hidden states by hooks that it looks up by the model's class name;
    ``fully_shard`` changes the class (``LlamaModel`` -> ``FSDPLlamaModel``), after which the reference would
    return no per-layer states for the learned masks.
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # transformers < 5 returns hidden states from the forward code itself
        return
    for module in model.modules():
        flags = getattr(module, "_can_record_outputs", None)
        if flags and not _CAN_RECORD_REGISTRY.get(module):
            _CAN_RECORD_REGISTRY[module] = flags


def _outermost(model: nn.Module, block: nn.Module) -> nn.Module:
    """The activation-checkpoint wrapper around ``block`` if there is one, else ``block``."""
    for module in model.modules():
        if getattr(module, "_checkpoint_wrapped_module", None) is block:
            return module
    return block


def shard_module(module: nn.Module, mesh: DeviceMesh) -> None:
    """One FSDP group (and root) for a small module called through its own ``forward`` (the mask networks)."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(module, mesh=mesh)


def check_all_sharded(modules: Iterable[tuple[str, nn.Module | None]]) -> None:
    """Raise if a parameter is left outside every FSDP group (it would get no gradient reduction).

    Raises:
        RuntimeError: naming the first such parameter.
    """
    for prefix, module in modules:
        if module is None:
            continue
        for name, param in module.named_parameters():
            if not isinstance(param, DTensor):
                raise RuntimeError(f"{prefix}.{name} is not sharded by fully_shard: its gradient would not be "
                                   "reduced across ranks. Fix: give its module an FSDP group in configure_model.")


def mixed_precision(param_dtype: str | None) -> Any:
    """FSDP2 mixed precision: compute in ``param_dtype``, reduce gradients in float32; None for full precision."""
    if param_dtype is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dtype = getattr(torch, param_dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"fsdp_param_dtype={param_dtype!r} is not a torch floating dtype. Fix: use 'bfloat16'.")
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def drop_frozen_keys_from_state_dict(module: nn.Module, frozen: set[str]) -> None:
    """Make ``module.state_dict()`` omit ``frozen`` keys and ``load_state_dict`` not miss them.

    Needed under ``ModelParallelStrategy``: its distributed checkpoint is written from, and read back into,
    ``get_model_state_dict(module)``, so keys left out by ``on_save_checkpoint`` (the reference, rebuilt from
    its source) would be requested on load and fail. With these hooks they are never part of the state.
    """

    def drop(mod: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for key in frozen:
            state_dict.pop(prefix + key, None)

    def forgive_missing(mod: nn.Module, incompatible_keys: Any) -> None:
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in frozen]

    module.register_state_dict_post_hook(drop)
    module.register_load_state_dict_post_hook(forgive_missing)
