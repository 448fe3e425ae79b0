"""Generation samples: completions of fixed prompts by the policy and by the reference, logged as text.

``GenerationSamples`` runs after every N-th validation run on rank 0: for each prompt (given in the config, or the
first ``num_prompts`` validation prompts exactly as the model sees them), it samples ``max_new_tokens`` tokens from
the policy and from the reference (with LoRA: the policy with its adapters disabled), greedily or with a
temperature, seeded, inside ``torch.random.fork_rng`` so training randomness is unchanged. Each prompt becomes one
TensorBoard text entry ``samples/prompt_{i}`` (Markdown with the prompt and both completions).

Not for sharded strategies (FSDP, DeepSpeed): generation on one rank would wait for the others' shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from sparsepo_lightning.callbacks.statistics import tensorboard_writers
from sparsepo_lightning.generation import decode_until_special, seeded_generate


def prompt_ids_from_batch(input_ids: Tensor, labels: Tensor, limit: int) -> list[Tensor]:
    """The prompt tokens (everything before the first response token) of the first ``limit`` chosen rows.

    Args:
        input_ids: ``(2B, T)`` ids of a ``PreferenceBatch`` (chosen rows first).
        labels: ``(2B, T)`` labels, ``IGNORE_INDEX`` outside the response (not shifted).
        limit: number of prompts wanted.

    Returns:
        Up to ``min(limit, B)`` 1-D CPU tensors.
    """
    num_pairs = input_ids.shape[0] // 2
    prompts = []
    for row in range(min(limit, num_pairs)):
        response = (labels[row] != -100).nonzero()
        start = int(response[0]) if len(response) else int(input_ids.shape[1])
        prompts.append(input_ids[row, :start].cpu())
    return prompts


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class GenerationSamples(Callback):
    """Log policy vs reference completions of fixed prompts every N validation runs (module docstring)."""

    reads_reference = True
    """The reference generates during the fit: ``model.reference_cache`` keeps its weights (reference_release.py)."""

    def __init__(self, prompts: list[str] | None = None, num_prompts: int = 4, max_new_tokens: int = 32,
                 temperature: float = 0.0, seed: int = 0, every_n_validations: int = 1) -> None:
        """
        Args:
            prompts: prompt texts, tokenized with the data module's tokenizer (special tokens added as it does
                by default; no chat template). Default: the first ``num_prompts`` validation prompts.
            num_prompts: prompts taken from the validation data when ``prompts`` is not set.
            max_new_tokens: tokens generated per completion.
            temperature: 0 for greedy decoding, else sampling at this temperature (no top-k/top-p).
            seed: sampling seed, the same at every run, so changes come from the model.
            every_n_validations: generate after every N-th validation run (the sanity check does not count).
        """
        super().__init__()
        if temperature < 0 or max_new_tokens < 1 or num_prompts < 1 or every_n_validations < 1:
            raise ValueError("GenerationSamples: need temperature >= 0 and max_new_tokens, num_prompts, "
                             f"every_n_validations >= 1; got {temperature}, {max_new_tokens}, {num_prompts}, "
                             f"{every_n_validations}.")
        self.prompts, self.num_prompts, self.max_new_tokens = prompts, num_prompts, max_new_tokens
        self.temperature, self.seed, self.every_n_validations = temperature, seed, every_n_validations
        self._validations = 0
        self._val_prompts: list[Tensor] = []
        self.last_samples: list[dict[str, str]] = []
        """The samples of the latest run (prompt, policy, reference), for notebooks and tests."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, DeepSpeedStrategy | FSDPStrategy | ModelParallelStrategy):
            raise ValueError(f"GenerationSamples does not support the sharded strategy "
                             f"{type(trainer.strategy).__name__}: remove it from trainer.callbacks.")

    def _due(self, trainer: Trainer) -> bool:
        return (not trainer.sanity_checking and trainer.is_global_zero
                and self._validations % self.every_n_validations == 0)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        wanted = self.num_prompts - len(self._val_prompts)
        if self.prompts is None and dataloader_idx == 0 and wanted > 0 and hasattr(batch, "labels"):
            self._val_prompts += prompt_ids_from_batch(batch.input_ids, batch.labels, wanted)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        due, self._validations = self._due(trainer), self._validations + 1
        if not due:
            return
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        if tokenizer is None:
            rank_zero_warn("GenerationSamples: no tokenizer on trainer.datamodule; no samples logged.")
            return
        prompts = self._prompt_ids(tokenizer)
        self.last_samples = self.generate(pl_module, tokenizer, prompts)
        for writer in tensorboard_writers(trainer):
            for i, sample in enumerate(self.last_samples):
                writer.add_text(f"samples/prompt_{i}", _markdown(sample), trainer.global_step)

    def _prompt_ids(self, tokenizer: Any) -> list[Tensor]:
        if self.prompts is not None:
            return [tokenizer(p, return_tensors="pt").input_ids[0] for p in self.prompts]
        return self._val_prompts

    @torch.no_grad()
    def generate(self, pl_module: LightningModule, tokenizer: Any, prompts: list[Tensor]) -> list[dict[str, str]]:
        """Completions of each prompt by the policy and (when there is one) the reference."""
        policy = pl_module.policy
        models: dict[str, tuple[nn.Module, Any]] = {"policy": (policy, nullcontext())}
        if getattr(pl_module, "uses_adapter_reference", False):
            models["reference"] = (policy, policy.disable_adapter())
        elif getattr(pl_module, "reference", None) is not None:
            models["reference"] = (pl_module.reference, nullcontext())
        samples = [{"prompt": tokenizer.decode(ids, skip_special_tokens=True)} for ids in prompts]
        for name, (model, context) in models.items():
            with context, _eval_mode(model):
                for sample, ids in zip(samples, prompts, strict=True):
                    sample[name] = self._complete(model, tokenizer, ids.to(pl_module.device))
        return samples

    def _complete(self, model: nn.Module, tokenizer: Any, ids: Tensor) -> str:
        options: dict[str, Any] = {"do_sample": False}
        if self.temperature > 0:
            options = {"do_sample": True, "temperature": self.temperature, "top_k": 0, "top_p": 1.0}
        # fork_rng inside: training randomness stays as it was
        new_ids = seeded_generate(model, tokenizer, [ids.tolist()], self.seed, 1, self.max_new_tokens, **options)
        return decode_until_special(tokenizer, new_ids[0])


def _markdown(sample: dict[str, str]) -> str:
    lines = [f"**prompt:** {sample['prompt']}"]
    lines += [f"**{name}:** {sample[name]}" for name in ("policy", "reference") if name in sample]
    return "\n\n".join(lines)
