"""PreferenceModule: policy + frozen reference + token masker + objective, one shared step for all stages."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from sparsepo_lightning import checkpointing, checks, reference_release, sharding
from sparsepo_lightning import meta_init as meta_init_lib
from sparsepo_lightning.callbacks.statistics import exactly_logged
from sparsepo_lightning.distribution_step import step_masks_and_statistics
from sparsepo_lightning.logprobs import final_hidden_states, output_head, reference_outputs, token_stats
from sparsepo_lightning.masks.base import ReferenceOutputs, TokenMasker
from sparsepo_lightning.metrics import log_metrics
from sparsepo_lightning.models import frozen_state_keys, load_frozen_models, load_policy_and_reference
from sparsepo_lightning.objectives import Objective, SparsePO
from sparsepo_lightning.optim import Schedule, parameter_groups, warmup_schedule
from sparsepo_lightning.types import PreferenceBatch, StepRecord, detached


class PreferenceModule(LightningModule):
    """Preference optimisation of a causal LM against a frozen reference copy.

    The reference is never saved in checkpoints: it is rebuilt from ``reference`` (or ``model``) and frozen,
    so a checkpoint holds the trained policy, the masks and the optimizer state only.
    """

    def __init__(
        self,
        model: str,
        objective: Objective | None = None,
        masker: TokenMasker | None = None,
        reference: str | None = None,
        frozen_models: dict[str, str] | None = None,
        tokenizer_name: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        mask_weight_decay: float = 0.01,
        mask_lr: float | None = None,
        warmup_ratio: float = 0.1,
        schedule: Schedule = "cosine",
        dtype: str = "float32",
        chunk_size: int = 1024,
        disable_dropout: bool = True,
        trust_remote_code: bool = False,
        lora: dict[str, Any] | None = None,
        max_consecutive_nonfinite: int = 10,
        mask_collapse_steps: int = 3,
        activation_checkpointing: bool = False,
        fsdp_param_dtype: str | None = None,
        meta_init: bool = False,
        attn_implementation: str | None = None,
        reference_cache: bool = False,
    ) -> None:
        """
        Args:
            model: policy to train: an alias (``smollm2-135m``), a local path or a hub name.
            objective: the preference objective; default ``SparsePO()`` (β = 0.8).
            masker: token masker for objectives that use masks (uniform, activation, learned, the plug-ins of
                ``sparsepo_lightning.methods``); default uniform (SparsePO = TDPO1).
            reference: frozen reference checkpoint; default the same as ``model``.
            frozen_models: extra frozen models by name (``{positive: path}``) for maskers that read them
                (``TokenMasker.frozen_model_names``): loaded, sharded and never checkpointed, like the reference.
            tokenizer_name: tokenizer name or path when ``model`` ships none (the CLI passes it to the data module);
                default the model's own.
            optimizer: optimizer class/callable taking parameter groups; default ``torch.optim.AdamW``.
                The learning rate and weight decays are set per group from the options below.
            lr: learning rate of the policy (and of the masks unless ``mask_lr`` is set).
            weight_decay: weight decay of policy weights (biases and norms never decay).
            mask_weight_decay: weight decay of mask-network weights (docs/method.md §1.4).
            mask_lr: separate learning rate for mask parameters (a deviation from the released code, §8.10).
            warmup_ratio: fraction of optimizer steps of linear warm-up.
            schedule: learning-rate decay after warm-up.
            dtype: weight dtype of both models (``float32``, ``bfloat16``, ``float16``); statistics stay fp32.
            chunk_size: response tokens per LM-head call in the log-prob/KL computation.
            disable_dropout: set the dropout of policy and reference to 0 (mask dropout is kept as configured).
            trust_remote_code: allow model code from the checkpoint (off: never run downloaded code by default).
            lora: train LoRA adapters (``peft.LoraConfig`` arguments, e.g. ``{r: 64, lora_alpha: 16,
                lora_dropout: 0.1, target_modules: [q_proj, k_proj, v_proj]}``) instead of all weights. The
                reference is then the same model with its adapters disabled: no second copy in memory
                (docs/method.md §4.1). Mask networks stay fully trainable and are saved with the adapters.
            max_consecutive_nonfinite: optimizer steps with a NaN/inf loss or gradient are skipped (weights and
                optimizer state unchanged) and logged; this many in a row stop the run (``NonFiniteGuard``).
            mask_collapse_steps: warn when the learned reward mask is (almost) entirely 0 for this many training
                batches in a row (``NonFiniteGuard``).
            activation_checkpointing: recompute each policy decoder block's activations in backward to save
                memory: every block is wrapped in a non-reentrant activation-checkpoint wrapper in
                ``configure_model`` (before FSDP2 sharding; any strategy, LoRA included). The one checkpointing
                option (it replaces ``gradient_checkpointing``, which did the same through transformers).
            fsdp_param_dtype: under ``ModelParallelStrategy`` (FSDP2), compute dtype of the sharded policy and
                reference (e.g. ``bfloat16``) with float32 gradient reduction; None computes in ``dtype``. Mask
                networks and per-token statistics stay float32.
            meta_init: build policy and reference without weights (meta device) and load them in
                ``configure_model``, after FSDP2 sharding: each rank reads only its shard from the safetensors
                files, so no rank holds two full models in CPU memory (``meta_init.py``). Needs safetensors
                checkpoints. With ``lora`` the adapters are initialised at once, the base weights loaded later.
                Without a trainer, call ``configure_model()`` before use.
            attn_implementation: of all models (``sdpa``, ``eager``, ``flex_attention``, ``flash_attention_2``...);
                None: transformers' choice. ``data.layout: packed`` takes sdpa, eager and flex_attention.
            reference_cache: compute the reference's label log-probs before training (docs/performance.md).
        """
        super().__init__()
        checks.check_options(lr, mask_lr, warmup_ratio, chunk_size, max_consecutive_nonfinite, mask_collapse_steps)
        self.save_hyperparameters(ignore=["objective", "masker", "optimizer"])
        self.objective = objective if objective is not None else SparsePO()
        checks.check_masker_objective(masker, self.objective)
        self.optimizer_factory, self._cache = optimizer, checks.reference_cache(self.objective, masker, reference_cache)
        self.policy, self.reference = load_policy_and_reference(
            model, reference, self.objective.needs_reference, dtype=dtype, trust_remote_code=trust_remote_code,
            lora=lora, meta_init=meta_init, disable_dropout=disable_dropout,
            attn_implementation=attn_implementation)
        self.masker = masker
        self.frozen_models = load_frozen_models(frozen_models, dtype=dtype, trust_remote_code=trust_remote_code,
                                                meta_init=meta_init, disable_dropout=disable_dropout,
                                                attn_implementation=attn_implementation)
        checks.check_frozen_models(masker, frozen_models, self.objective)
        self._model_configured = False  # configure_model runs once
        self._sharded = False  # set by configure_model under ModelParallelStrategy (FSDP2)
        self._packed_checked = False  # models checked on the packed layout (checks.check_packed_layout)
        self.last_step: StepRecord | None = None
        """Detached tensors of the latest batch (see ``StepRecord``), for callbacks."""
        if self.objective.uses_masks and self.masker is not None:
            bound = self.reference if self.reference is not None else self._causal_lm
            checks.check_masker_reference(self.masker, bound)
            self.masker.bind(bound)

    @property
    def _causal_lm(self) -> nn.Module:
        """The policy's Hugging Face causal LM (inside the ``PeftModel`` wrapper with LoRA)."""
        return self.policy.get_base_model() if self.hparams.lora is not None else self.policy

    @property
    def uses_adapter_reference(self) -> bool:
        """True when the reference is the policy with its LoRA adapters disabled."""
        return self.hparams.lora is not None and self.objective.needs_reference

    # ---- training mode and checkpoints -------------------------------------------------------------------
    def train(self, mode: bool = True) -> PreferenceModule:
        """Keep the frozen reference in eval mode whatever Lightning asks of the rest."""
        super().train(mode)
        for frozen in (model for model in (self.reference, self.frozen_models) if model is not None):
            frozen.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the objective's state; drop the reference and LoRA base weights, rebuilt on load (not under FSDP1)."""
        checkpointing.save_module_state(checkpoint, self.objective, self._frozen_state_keys(),
                                        getattr(self._trainer, "strategy", None))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpointing.load_module_state(checkpoint, self.objective, self._frozen_state_keys(), self.state_dict)

    def _frozen_state_keys(self) -> set[str]:
        return frozen_state_keys(self.policy, self.reference, self.hparams.lora is not None, self.frozen_models)

    # ---- sharding ----------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Activation checkpointing (option), then FSDP2 sharding under ``ModelParallelStrategy`` (``sharding.py``):
        once, before ``configure_optimizers``. The frozen keys (reference, LoRA base) are hidden from the state
        dict, so distributed checkpoints omit them on save and do not ask for them on load."""
        if self._model_configured:
            return
        self._model_configured = True
        if self.hparams.get("activation_checkpointing"):
            sharding.checkpoint_blocks(self._causal_lm)
        if self.device_mesh is None:
            self._load_meta_weights()
            return
        self._sharded = True
        sharding.drop_frozen_keys_from_state_dict(self, self._frozen_state_keys())
        frozen = dict(self.frozen_models or {})
        sharding.shard_preference_models(self._causal_lm, self.reference, self.masker, self.device_mesh,
                                         self.hparams.get("fsdp_param_dtype"), frozen=list(frozen.values()))
        sharding.check_all_sharded([("policy", self.policy), ("reference", self.reference), ("masker", self.masker),
                                    *((f"frozen_models.{name}", model) for name, model in frozen.items())])
        self._load_meta_weights()

    def _load_meta_weights(self) -> None:
        """With ``meta_init``: allocate and load policy and reference weights (each rank its shard if sharded)."""
        device = self._trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        frozen = tuple(self.frozen_models.values()) if self.frozen_models is not None else ()
        meta_init_lib.load_meta_weights((self._causal_lm, self.reference, *frozen), device)

    # ---- the step ----------------------------------------------------------------------------------------
    def _reference_outputs(self, batch: PreferenceBatch) -> ReferenceOutputs | None:
        if self.reference is None and not self.uses_adapter_reference:
            return None
        if self.reference is None:  # LoRA: the policy with its adapters disabled
            return reference_outputs(self._causal_lm, batch.input_ids, batch.attention_mask, self.masker,
                                     inference=False, context=self.policy.disable_adapter(), packed=batch.packed)
        return reference_outputs(reference_release.live(self), batch.input_ids, batch.attention_mask, self.masker,
                                 inference=not self._sharded, packed=batch.packed)

    def _shared_step(self, batch: PreferenceBatch, stage: str) -> Tensor:
        if batch.packed is not None and not self._packed_checked:
            self._packed_checked = checks.check_packed_layout(self._causal_lm, self.reference, self.frozen_models)
        labels, response_mask = batch.shifted_labels()
        policy_hidden, _ = final_hidden_states(self._causal_lm, batch.input_ids, batch.attention_mask,
                                               packed=batch.packed)
        reference = None if self._cache.serves(stage) else self._reference_outputs(batch)
        stats = self._cache.fill(token_stats(  # with reference_cache: its log-probs from the cache
            policy_hidden, labels, response_mask, output_head(self._causal_lm),
            reference_hidden=None if reference is None else reference.last_hidden,
            reference_head=None if reference is None else reference.head,
            with_kl=self.objective.needs_kl, chunk_size=self.hparams.chunk_size,
        ), stage, batch)
        masks = step_masks_and_statistics(self, batch, stats, policy_hidden, reference, not self._sharded)
        out = self.objective.step(stats, masks, batch, training=stage == "train")  # pairs, or BCO's unpaired rows
        effective = self.objective.effective_masks(masks, response_mask)
        metrics = self.objective.metrics(stats, effective, out, batch)
        log_metrics(self, stage, metrics, out.loss.shape[0], exactly_logged(getattr(self._trainer, "callbacks", [])))
        self.last_step = StepRecord(stage, batch, detached(stats), detached(effective), detached(out), metrics)
        return out.loss.mean()

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def configure_callbacks(self) -> list[Callback]:
        """The non-finite guard, the run summary (replacing their type in trainer.callbacks), the reference cache."""
        from sparsepo_lightning.callbacks.nonfinite import NonFiniteGuard
        from sparsepo_lightning.callbacks.summary import RunSummary

        return [NonFiniteGuard(self.hparams.max_consecutive_nonfinite, self.hparams.mask_collapse_steps),
                RunSummary(), self._cache]

    def setup(self, stage: str) -> None:
        """Check options that depend on the trainer (precision, device) before any step runs."""
        if stage == "fit":
            checks.check_precision(str(self.trainer.precision), self.named_parameters(), self.hparams.dtype)
            checks.check_attention_device(self.hparams.attn_implementation, self.trainer.strategy.root_device.type)

    # ---- optimisation ------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = parameter_groups(self.policy, self.masker, hp.lr, hp.weight_decay, hp.mask_weight_decay, hp.mask_lr)
        optimizer = self.optimizer_factory(groups)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = warmup_schedule(optimizer, total, hp.warmup_ratio, hp.schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
