"""PreferenceModule: policy + frozen reference + token masker + objective, one shared step for all stages."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from sparsepo_lightning.logprobs import final_hidden_states, output_head, token_stats
from sparsepo_lightning.masks.base import ReferenceOutputs, TokenMasker
from sparsepo_lightning.metrics import preference_metrics
from sparsepo_lightning.models import load_causal_lm
from sparsepo_lightning.objectives import Objective, SparsePO
from sparsepo_lightning.optim import Schedule, parameter_groups, warmup_schedule
from sparsepo_lightning.types import LossOutput, PreferenceBatch, StepRecord, TokenMasks, TokenStats

PROGRESS_BAR_METRICS = ("loss", "rewards/margin", "masks/sparsity_reward_chosen")


def _detached(value: TokenStats | TokenMasks | LossOutput | None) -> Any:
    """A copy of a tensor dataclass whose tensors are detached (bools and other fields kept)."""
    if value is None:
        return None
    fields = {k: v.detach() if isinstance(v, Tensor) else v for k, v in vars(value).items()}
    return type(value)(**fields)


def _with_lora(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    """``peft.get_peft_model`` with a causal-LM ``LoraConfig`` built from ``options`` (errors name the option)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("model.lora needs the `peft` package: pip install peft") from e
    try:
        config = LoraConfig(task_type="CAUSAL_LM", **options)
    except TypeError as e:
        raise ValueError(f"model.lora={options}: {e}. Fix: use peft.LoraConfig argument names.") from None
    return get_peft_model(model, config)


def _disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


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
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        lora: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            model: policy to train: an alias (``smollm2-135m``), a local path or a hub name.
            objective: the preference objective; default ``SparsePO()`` (β = 0.8).
            masker: token masker for SparsePO (uniform, activation, learned); default uniform (= TDPO1).
            reference: frozen reference checkpoint; default the same as ``model``.
            tokenizer_name: tokenizer name or path when ``model`` ships none (the CLI passes it to the data module);
                default the model's own.
            optimizer: optimizer class/callable taking parameter groups; default ``torch.optim.AdamW``.
                The learning rate and weight decays are set per group from the options below.
            lr: learning rate of the policy (and of the masks unless ``mask_lr`` is set).
            weight_decay: weight decay of policy weights (biases and norms never decay).
            mask_weight_decay: weight decay of mask-network weights (method.md §1.4).
            mask_lr: separate learning rate for mask parameters (a deviation from the released code, §8.10).
            warmup_ratio: fraction of optimizer steps of linear warm-up.
            schedule: learning-rate decay after warm-up.
            dtype: weight dtype of both models (``float32``, ``bfloat16``, ``float16``); statistics stay fp32.
            chunk_size: response tokens per LM-head call in the log-prob/KL computation.
            disable_dropout: set the dropout of policy and reference to 0 (mask dropout is kept as configured).
            gradient_checkpointing: recompute policy activations in backward to save memory.
            trust_remote_code: allow model code from the checkpoint (off: never run downloaded code by default).
            lora: train LoRA adapters (``peft.LoraConfig`` arguments, e.g. ``{r: 64, lora_alpha: 16,
                lora_dropout: 0.1, target_modules: [q_proj, k_proj, v_proj]}``) instead of all weights. The
                reference is then the same model with its adapters disabled: no second copy in memory
                (method.md §4.1). Mask networks stay fully trainable and are saved with the adapters.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["objective", "masker", "optimizer"])
        self.objective = objective if objective is not None else SparsePO()
        if masker is not None and not self.objective.uses_masks:
            raise ValueError(f"masker={type(masker).__name__} has no effect with objective "
                             f"{type(self.objective).__name__}: only SparsePO uses token masks. Remove `masker`.")
        self.optimizer_factory = optimizer
        if lora is not None and reference is not None:
            raise ValueError("model.lora uses the policy with adapters disabled as the reference; a separate "
                             f"model.reference={reference!r} contradicts it. Fix: remove one of the two options.")
        self.policy = load_causal_lm(model, dtype=dtype, trust_remote_code=trust_remote_code)
        self.reference: nn.Module | None = None
        if self.objective.needs_reference and lora is None:
            self.reference = load_causal_lm(reference or model, dtype=dtype, trust_remote_code=trust_remote_code)
            self.reference.requires_grad_(False).eval()
        if disable_dropout:  # before adding adapters: LoRA's own dropout is an option of `lora`
            for lm in (self.policy, self.reference):
                if lm is not None:
                    _disable_dropout(lm)
        if lora is not None:
            self.policy = _with_lora(self.policy, lora)
        self.policy.train()  # from_pretrained returns eval mode; Lightning keeps modules in the mode they have
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.masker = masker
        self.last_step: StepRecord | None = None
        """Detached tensors of the latest batch (see ``StepRecord``), for callbacks."""
        if self.objective.uses_masks and self.masker is not None:
            self.masker.bind(self.reference if self.reference is not None else self._causal_lm)

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
        if self.reference is not None:
            self.reference.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop what is rebuilt from its source on load: the reference, and with LoRA the frozen base weights."""
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k not in self._frozen_state_keys()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        own = self.state_dict()  # keep strict loading for everything that was saved
        checkpoint["state_dict"].update({k: own[k] for k in self._frozen_state_keys()})

    def _frozen_state_keys(self) -> set[str]:
        keys = {f"reference.{k}" for k in self.reference.state_dict()} if self.reference is not None else set()
        if self.hparams.lora is not None:
            trainable = {f"policy.{name}" for name, p in self.policy.named_parameters() if p.requires_grad}
            keys |= {k for k in self.state_dict() if k.startswith("policy.") and k not in trainable}
        return keys

    # ---- the step ----------------------------------------------------------------------------------------
    def _reference_outputs(self, batch: PreferenceBatch) -> ReferenceOutputs | None:
        if self.reference is None and not self.uses_adapter_reference:
            return None
        reference = self.reference if self.reference is not None else self._causal_lm
        adapters_off = self.policy.disable_adapter() if self.reference is None else nullcontext()
        needs_layers = self.masker is not None and self.masker.needs_layers
        recording = self.masker.recording() if self.masker is not None else nullcontext()
        with torch.no_grad(), adapters_off, recording:
            last, layers = final_hidden_states(reference, batch.input_ids, batch.attention_mask, needs_layers)
        return ReferenceOutputs(last_hidden=last, layers=layers, head=output_head(reference))

    def _shared_step(self, batch: PreferenceBatch, stage: str) -> Tensor:
        labels, response_mask = batch.shifted_labels()
        policy_hidden, _ = final_hidden_states(self._causal_lm, batch.input_ids, batch.attention_mask)
        reference = self._reference_outputs(batch)
        stats = token_stats(
            policy_hidden, labels, response_mask, output_head(self._causal_lm),
            reference_hidden=None if reference is None else reference.last_hidden,
            reference_head=None if reference is None else reference.head,
            with_kl=self.objective.needs_kl, chunk_size=self.hparams.chunk_size,
        )
        masks = self.masker(reference, response_mask) if self.masker is not None else None
        out = self.objective(stats, masks)
        effective = self.objective.effective_masks(masks, response_mask)
        metrics = preference_metrics(stats, effective, out)
        self._log_metrics(stage, metrics, batch.num_pairs)
        self.last_step = StepRecord(stage, batch, _detached(stats), _detached(effective), _detached(out), metrics)
        return out.loss.mean()

    def _log_metrics(self, stage: str, metrics: dict[str, Tensor], batch_size: int) -> None:
        train = stage == "train"
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, prog_bar=name in PROGRESS_BAR_METRICS, on_step=train,
                     on_epoch=not train, sync_dist=not train, batch_size=batch_size)

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: PreferenceBatch, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    # ---- optimisation ------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = parameter_groups(self.policy, self.masker, hp.lr, hp.weight_decay, hp.mask_weight_decay, hp.mask_lr)
        optimizer = self.optimizer_factory(groups)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = warmup_schedule(optimizer, total, hp.warmup_ratio, hp.schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
