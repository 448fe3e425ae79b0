"""First-optimizer-step statistics of ``MaskStatistics`` + ``RewardStatistics`` for ``tests/test_callbacks.py``.

Run in-process (1 device, with or without gradient accumulation) or on 2 CPU ranks (gloo) as the ``ddp_statistics``
mode of ``tests/distributed_run.py`` (Lightning re-launches that script once per rank; ``ddp_spawn`` cannot pickle
transformers-5 models, whose output-capturing hooks are local functions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer, seed_everything
from torch import Tensor, nn
from torch.utils.data import DataLoader

from sparsepo_lightning.callbacks import MaskStatistics, RewardStatistics
from sparsepo_lightning.data import PreferenceDataModule
from sparsepo_lightning.masks.base import ReferenceOutputs, TokenMasker
from sparsepo_lightning.masks.learned import MaskNetwork
from sparsepo_lightning.module import PreferenceModule
from sparsepo_lightning.objectives import SparsePO
from sparsepo_lightning.types import TokenMasks


class IdMasker(TokenMasker):
    """Hand-made masks: m at column t is ``(input_ids[:, t] % 3) / 2`` ∈ {0, 0.5, 1} on response tokens.

    The ids come from a forward hook on the reference's embedding. It also runs a frozen ``reward_net`` with
    constant units (unit 0 pre-activation −1: dead, unit 1 +1: alive), so the dead-unit fraction is exactly 0.5.
    """

    needs_layers = True

    def __init__(self) -> None:
        super().__init__()
        self._ids: dict[str, Tensor] = {}
        self.reward_net: MaskNetwork | None = None

    def bind(self, reference: nn.Module) -> None:
        config = reference.config
        self.reward_net = MaskNetwork(config.num_hidden_layers, config.hidden_size).requires_grad_(False)
        with torch.no_grad():
            self.reward_net.layer_weight.zero_()
            self.reward_net.layer_bias.copy_(torch.tensor([-1.0, 1.0]))
        reference.get_input_embeddings().register_forward_hook(self._record_ids)

    def _record_ids(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        self._ids["input_ids"] = args[0]

    def forward(self, reference: ReferenceOutputs, response_mask: Tensor) -> TokenMasks:
        states = torch.stack([layer[:, :-1][response_mask] for layer in reference.layers], dim=1)  # (n, L, d)
        self.reward_net(states)  # output unused: only the dead-unit hooks see it
        ids = self._ids["input_ids"][:, :-1]  # the token at position t weights the label at column t
        mask = (ids % 3).float() / 2 * response_mask
        return TokenMasks(reward=mask, kl=mask, common=True, learned=False)


def first_pairs(model_dir: str, pairs: str, n: int = 4) -> tuple[list[Any], Any]:
    """The first ``n`` tokenised pairs of the file and the data module's collate function."""
    data = PreferenceDataModule(tokenizer=model_dir, train_file=pairs, val_file=pairs, batch_size=2, max_length=32,
                                max_prompt_length=16)
    data.setup("fit")
    loader = data.train_dataloader()
    return list(loader.dataset)[:n], loader.collate_fn


def first_step_statistics(model_dir: str, pairs: str, batch_size: int, root: Path,
                          **trainer_kwargs: Any) -> dict[str, float]:
    """``train_step/*`` values after one optimizer step over the first 4 pairs in file order."""
    seed_everything(0)
    rows, collate = first_pairs(model_dir, pairs)
    module = PreferenceModule(model=model_dir, objective=SparsePO(), masker=IdMasker(), lr=1e-3)
    # Not shuffled: with 2 ranks Lightning's DistributedSampler(shuffle=False) gives rank r the pairs r, r + 2.
    loader = DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collate)
    trainer = Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                      log_every_n_steps=1, callbacks=[MaskStatistics(), RewardStatistics()], **trainer_kwargs)
    trainer.fit(module, train_dataloaders=loader)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train_step/")}
