"""Two-process CPU (gloo) training runs for ``tests/test_distributed.py``: Lightning re-launches this file per rank.

Usage: ``python tests/distributed_run.py MODES OUT_DIR MODEL_DIR PAIRS_FILE`` with MODES a comma-separated list of

- ``ddp`` / ``fsdp2`` / ``fsdp2_bf16_ac``: one SGD step on 2 pairs per rank; every rank writes
  ``OUT_DIR/rank{r}.pt`` with its loss and the full (gathered) weights of policy, reference and masks
  before and after the step;
- ``fsdp2_lora`` / ``fsdp2_clip`` / ``fsdp2_meta`` / ``fsdp2_lora_meta``: the same with LoRA adapters / with
  ``gradient_clip_val`` / with ``meta_init`` (weights loaded shard by shard after sharding) / with both;
- ``fsdp2_resume`` / ``fsdp1_resume``: an uninterrupted 8-step AdamW run, then a 4-step run that saves a
  sharded checkpoint and a run resumed from it for the last 4 steps; writes the losses of the three runs per rank;
- ``fsdp2_chunks``: FSDP2 with ``chunk_size=2``, so the ranks (different response lengths) call the sharded LM
  head a different number of times per step;
- ``fsdp2_frozen`` / ``single_frozen``: a token-weighting plug-in with two extra frozen models (TIS-DPO weights,
  ``WeightedDPO``) under FSDP2 on 2 ranks / in one process; also records whether the frozen models are sharded;
- ``fsdp2_aligndistil``: AlignDistil (full-distribution statistic over four models: policy, reference and the
  DPO / reverse-DPO frozen models, here the tied tiny Llama and the tiny model) under FSDP2 with ``chunk_size=2``,
  so the ranks make different numbers of chunks and the statistic's head calls must follow the agreed count;
- ``ddp_treg`` / ``fsdp2_treg`` / ``ddp_treg_packed`` / ``fsdp2_treg_packed``: T-REG as ``configs/methods/treg.yaml``
  on the row lengths of ``configs/debug/tiny.yaml`` (``treg_options``): each batch carries two prompt variants per
  pair that the reference scores, in 2-token chunks (ranks make different numbers of head calls on them), in the
  padded and in the packed layout; ``fsdp2_treg_policy``: the policy scores them (``scorer: policy``);
- ``fsdp2_export`` / ``fsdp1_export``: two AdamW steps, then a sharded checkpoint ``OUT_DIR/sharded`` (one
  shard per rank + ``meta.pt``) and the full (gathered) policy and mask weights at that point
  (``tests/test_export.py`` exports the folder and compares);
- ``fsdp2_tied`` / ``fsdp2_meta_tied``: ``fsdp2`` / ``fsdp2_meta`` on the tiny Llama with tied input embedding
  and LM head (built here, seeded, with MODEL_DIR's tokenizer; its folder is in the result);
- ``fsdp2_sparse``: ``fsdp2`` with a learned mask at a target sparsity (``LearnedMasker(target_sparsity=0.5)``: the
  gate's parameters are sharded with the mask network);
- ``ddp_statistics``: the first step's ``MaskStatistics`` / ``RewardStatistics`` values under DDP
  (``tests/callbacks_run.py``; compared with one process by ``tests/test_callbacks.py``);
- ``ddp_reference_cache`` / ``fsdp2_reference_cache``: ``model.reference_cache`` (``cache_options``): the ranks
  build the cache together (under FSDP2 in pieces of 12 pairs, so that one rank has more reference calls to make
  than the other), then one step. Records the rows each rank computed (the rest it read from the other's pieces);
- ``fsdp1``: FSDP1 (``FSDPStrategy``: per-block auto-wrap, activation checkpointing, ``use_orig_params``) on
  CPU through ``CPUFSDPStrategy``, which only passes the CPU device to FSDP1 (Lightning allows FSDP1 on GPUs
  only; torch runs it on CPU with gloo when the device is given).

The test runs the same functions in one process (``devices=1``, 4 pairs per batch) as the baseline.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler

from sparsepo_lightning.blocks import decoder_blocks
from sparsepo_lightning.data import PreferenceDataModule
from sparsepo_lightning.data.tokenize import tokenize_pair
from sparsepo_lightning.masks import LearnedMasker
from sparsepo_lightning.module import PreferenceModule
from sparsepo_lightning.objectives import SparsePO

REPO = Path(__file__).resolve().parents[1]
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
CLIP = 0.01
"""Small enough that the global gradient norm is clipped (so clipping under FSDP2 is actually exercised)."""
STEPS_PER_EPOCH = 4  # 16 pairs, 4 pairs per optimizer step (2 per rank x 2 ranks)


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` on CPU, for tests: wraps with ``device_id=cpu`` (Lightning passes ``None`` there, which
    FSDP1 refuses without an accelerator). Everything else (auto-wrap, checkpointing, state dicts) is Lightning's.
    A subclass also passes Lightning's GPU-only check, which looks for the exact ``FSDPStrategy`` type."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:  # FSDPStrategy._setup_model, CPU device
        from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                         mixed_precision=self.mixed_precision_config,
                                         sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                         **self.kwargs)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model


def fsdp1_strategy() -> CPUFSDPStrategy:
    """The layout of ``configs/distributed/fsdp1.yaml`` (block class = the tiny Llama's), on CPU."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return CPUFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, activation_checkpointing_policy={LlamaDecoderLayer},
                           state_dict_type="sharded", sharding_strategy="FULL_SHARD")


class InOrderData(PreferenceDataModule):
    """Training pairs in file order, so 1 process x 4 pairs and 2 ranks x 2 pairs see the same global batch.

    Lightning's own training sampler always shuffles, so the trainer runs with ``use_distributed_sampler=False``
    and ranks get a non-shuffling ``DistributedSampler`` here: rank r takes pairs r, r+2, ...
    """

    def train_dataloader(self) -> DataLoader:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        sampler = DistributedSampler(self._split("train"), shuffle=False) if distributed else None
        return self._loader("train", sampler=sampler)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.rows: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.rows.append(batch.input_ids.cpu())


class StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def make_module(model_dir: str, optimizer: Any = torch.optim.SGD, lr: float = 0.1, **options: Any) -> PreferenceModule:
    seed_everything(0)  # same mask-network init on every rank and in the single-process baseline
    objective = options.pop("objective", None)
    masker = options.pop("masker") if "masker" in options else LearnedMasker()  # masker=None: none
    return PreferenceModule(model=model_dir, objective=objective or SparsePO(l1_reward=0.01, l1_kl=0.01),
                            masker=masker, optimizer=optimizer, lr=lr, warmup_ratio=0.0,
                            schedule="constant", **options)


def frozen_options(model_dir: str) -> dict[str, Any]:
    """TIS-DPO weights from two extra frozen models (both the tiny model here: what matters is the plumbing)."""
    from sparsepo_lightning.methods.tisdpo import ContrastiveImportance
    from sparsepo_lightning.objectives import WeightedDPO

    return {"objective": WeightedDPO(beta=0.5), "masker": ContrastiveImportance(),
            "frozen_models": {"positive": model_dir, "negative": model_dir}}


def aligndistil_options(model_dir: str, dpo_dir: str) -> dict[str, Any]:
    """AlignDistil with two different frozen models (so the teacher differs from the reference) and 2-token chunks."""
    from sparsepo_lightning.methods.aligndistil import AlignDistil

    return {"objective": AlignDistil(responses="both"), "masker": None, "chunk_size": 2,
            "frozen_models": {"dpo": dpo_dir, "reverse_dpo": model_dir}}


def treg_options(scorer: str | None = None) -> dict[str, Any]:
    """T-REG as ``configs/methods/treg.yaml`` composes it on ``configs/debug/tiny.yaml``: its objective (with another
    ``scorer`` if given) and masker, and the recipe's row lengths (at the harness's 32 tokens both contrastive prompts
    are cut to the same tokens, so every token reward would be 0); 2-token chunks, so ranks make different numbers of
    head calls on the variant rows."""
    import dataclasses

    from lightning.pytorch.cli import instantiate_class

    method = yaml.safe_load((REPO / "configs" / "methods" / "treg.yaml").read_text())["model"]
    tiny = yaml.safe_load((REPO / "configs" / "debug" / "tiny.yaml").read_text())["data"]["init_args"]
    built = {part: None if method[part] is None else instantiate_class((), method[part])
             for part in ("objective", "masker")}
    lengths = {key: tiny[key] for key in ("max_length", "max_prompt_length")}
    if scorer is not None:
        built["objective"] = dataclasses.replace(built["objective"], scorer=scorer)
    return {**built, "chunk_size": 2, "data_options": lengths}


def make_data(model_dir: str, pairs: str, batch_size: int, layout: str = "padded", max_length: int = 32,
              max_prompt_length: int = 16) -> InOrderData:
    return InOrderData(tokenizer=model_dir, train_file=pairs, val_file=pairs, batch_size=batch_size,
                       max_length=max_length, max_prompt_length=max_prompt_length, layout=layout)


def make_trainer(strategy: str, devices: int, root: Path, max_steps: int, callbacks: list[Callback],
                 **trainer_options: Any) -> Trainer:
    if strategy == "fsdp2":
        strategy_obj: Any = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    elif strategy == "fsdp1":
        strategy_obj = fsdp1_strategy()
    else:
        strategy_obj = strategy
    return Trainer(accelerator="cpu", devices=devices, strategy=strategy_obj, max_steps=max_steps,
                   limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, callbacks=callbacks,
                   **{"use_distributed_sampler": False, **trainer_options})


def full_state(module: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """Full tensors of a (possibly FSDP2-sharded) module's state; a collective call under FSDP2."""
    if module is None:
        return {}
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone().float()
            for k, v in module.state_dict().items()}


def snapshot(module: PreferenceModule) -> dict[str, dict[str, torch.Tensor]]:
    strategy = module._trainer.strategy if module._trainer is not None else None
    if isinstance(strategy, FSDPStrategy) and strategy.model is not None:  # FSDP1: gather the flat shards
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(strategy.model, writeback=False):
            return {part: _unwrapped_parameters(getattr(module, part)) for part in ("policy", "reference", "masker")}
    return {"policy": full_state(module.policy), "reference": full_state(module.reference),
            "masker": full_state(module.masker)}


def _unwrapped_parameters(module: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """Parameters under the names the unwrapped module has (FSDP1/checkpoint-wrapper prefixes removed)."""
    if module is None:
        return {}
    clean = lambda name: name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")  # noqa: E731
    return {clean(k): v.detach().clone().float() for k, v in module.named_parameters()}


class Snapshot(Callback):
    """Weights when training starts (after sharding), so the test sees what the step changed."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.before = snapshot(pl_module)
        self.block_dtypes: list[torch.dtype] = []
        block = decoder_blocks(pl_module.policy)[0]
        block.register_forward_hook(lambda mod, args, out: self.block_dtypes.append(_first_tensor(out).dtype))
        self.checkpointed = sum(isinstance(m, CheckpointWrapper) for m in pl_module.policy.modules())


def _first_tensor(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def one_step(strategy: str, devices: int, model_dir: str, pairs: str, root: Path,
             gradient_clip_val: float | None = None, **options: Any) -> dict[str, Any]:
    """One optimizer step (SGD: the update is ``-lr * gradient``) on 4 pairs in all; returns loss and weights."""
    from sparsepo_lightning import reference_release

    layout, data_options = options.pop("layout", "padded"), options.pop("data_options", {})
    module = make_module(model_dir, **options)
    recorder, before = LossRecorder(), Snapshot()
    trainer = make_trainer(strategy, devices, root, max_steps=1, callbacks=[recorder, before],
                           gradient_clip_val=gradient_clip_val)
    trainer.fit(module, datamodule=make_data(model_dir, pairs, batch_size=4 // devices, layout=layout,
                                             **data_options))
    frozen = module.frozen_models
    sharded = None if frozen is None else all(isinstance(p, DTensor) for p in frozen.parameters())
    return {"loss": recorder.losses, "rows": recorder.rows, "before": before.before, "after": snapshot(module),
            "frozen_sharded": sharded,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "block_dtypes": before.block_dtypes, "checkpointed_blocks": before.checkpointed,
            "rank": trainer.global_rank,
            "reference_training": module.reference.training if module.reference is not None else False,
            "reference_released": module.reference is not None and reference_release.released(module.reference),
            "reference_rows_computed": None if module._cache.cache is None else module._cache.cache.rows_computed}


def cache_options(masker: str) -> dict[str, Any]:
    """WeightedDPO with ExcessLossSelection (``excess``: reads the reference log-probs in its context) or with
    UniformMasker (``uniform``: DPO); ``--model.reference_cache`` is added by the caller."""
    from sparsepo_lightning.masks import UniformMasker
    from sparsepo_lightning.methods.rho1 import ExcessLossSelection
    from sparsepo_lightning.objectives import WeightedDPO

    weights = ExcessLossSelection(keep_ratio=0.5, scope="response") if masker == "excess" else UniformMasker()
    return {"objective": WeightedDPO(beta=0.5), "masker": weights}


def cached_reference_step(strategy: str, model_dir: str, pairs: str, root: Path) -> dict[str, Any]:
    """``one_step`` with the reference cache, built in this mode's own cache folder by both ranks."""
    from sparsepo_lightning import reference_cache
    from sparsepo_lightning.data.token_cache import CACHE_ENV_VAR

    os.environ[CACHE_ENV_VAR] = str(root / "cache")  # the same folder on both ranks
    if strategy == "fsdp2":
        reference_cache.PIECE_ROWS = 12  # pieces of 12 + 4 pairs per split: rank 0 gets 24 pairs, rank 1 8
    masker = "uniform"  # at the first step ρ = 0 on every token: ExcessLossSelection's choice would be rounding's
    first = one_step(strategy, 2, model_dir, pairs, root / "first", reference_cache=True, **cache_options(masker))
    return first | {"computed": first["reference_rows_computed"]}


def resume(model_dir: str, pairs: str, root: Path, strategy: str = "fsdp2") -> dict[str, Any]:
    """Losses of an uninterrupted 8-step run, of its first epoch (4 steps, then a sharded checkpoint is saved)
    and of the run resumed from that checkpoint; the checkpoint directory is ``root / "epoch1"``."""
    adamw = dict(optimizer=torch.optim.AdamW, lr=1e-2)
    runs: dict[str, Any] = {}
    for name, callbacks_extra in (("full", []), ("part1", [StopAfterFirstEpoch()])):
        recorder = LossRecorder()
        trainer = make_trainer(strategy, 2, root / name, 2 * STEPS_PER_EPOCH, [recorder, *callbacks_extra])
        trainer.fit(make_module(model_dir, **adamw), datamodule=make_data(model_dir, pairs, batch_size=2))
        runs[name] = recorder.losses
    trainer.save_checkpoint(root / "epoch1")
    recorder = LossRecorder()
    trainer = make_trainer(strategy, 2, root / "resumed", 2 * STEPS_PER_EPOCH, [recorder])
    trainer.fit(make_module(model_dir, **adamw), datamodule=make_data(model_dir, pairs, batch_size=2),
                ckpt_path=root / "epoch1")
    runs["resumed"] = recorder.losses
    runs["rank"] = trainer.global_rank
    runs["checkpoint"] = str(root / "epoch1")
    return runs


def sharded_export(model_dir: str, pairs: str, root: Path, strategy: str) -> dict[str, Any]:
    """Two AdamW steps, a sharded checkpoint at ``root / "sharded"`` and the gathered weights at that point."""
    module = make_module(model_dir, optimizer=torch.optim.AdamW, lr=1e-2)
    trainer = make_trainer(strategy, 2, root / "root", max_steps=2, callbacks=[])
    trainer.fit(module, datamodule=make_data(model_dir, pairs, batch_size=2))
    trainer.save_checkpoint(root / "sharded")
    full = snapshot(module)  # collective: all ranks
    return {"policy": full["policy"], "masker": full["masker"], "global_step": trainer.global_step,
            "sharded": str(root / "sharded"), "model_dir": model_dir, "rank": trainer.global_rank}


def tied_model(model_dir: str, root: Path) -> str:
    """The tiny Llama with tied input/output embeddings (seeded) and the tokenizer of ``model_dir``, saved once:
    by rank 0 when the process group is up (transformers saves on rank 0 only), else by each process."""
    from transformers import AutoTokenizer

    from tests.tiny_models import tiny_llama

    group = torch.distributed.is_initialized()
    folder = root / ("tied-model" if group else f"tied-model-{os.getpid()}")
    if not group or torch.distributed.get_rank() == 0:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = tiny_llama(tied=True, vocab=len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    if group:
        torch.distributed.barrier()
    return str(folder)


TOKENISED: list[str] = []
"""Pairs this process tokenised (``CountingData``)."""


def _counting_tokenize(pair: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    TOKENISED.append(pair.source)
    return tokenize_pair(pair, *args, **kwargs)


class CountingData(PreferenceDataModule):
    """Counts the pairs each rank tokenises: with the tokenised cache, rank 0 builds it in ``prepare_data`` and the
    other rank only reads it."""

    tokenize_fn = staticmethod(_counting_tokenize)


def budget_run(model_dir: str, pairs: str, root: Path) -> dict[str, Any]:
    """3 steps of token-budget micro-batches on the packed layout under DDP, with Lightning's distributed-sampler
    injection on (its default): the micro-batch sampler must be kept and deal different micro-batches to the ranks."""
    recorder = LossRecorder()
    data = CountingData(tokenizer=model_dir, train_file=pairs, max_length=32, max_prompt_length=16, layout="packed",
                        max_tokens=128)
    trainer = make_trainer("ddp", 2, root, 3, [recorder], use_distributed_sampler=True)
    trainer.fit(make_module(model_dir), datamodule=data)
    sampler = trainer.train_dataloader.sampler
    return {"rows": recorder.rows, "loss": recorder.losses, "rank": trainer.global_rank,
            "sampler": type(sampler).__name__, "order": list(sampler.order), "tokenised": len(TOKENISED)}


def main(modes: str, out_dir: str, model_dir: str, pairs: str) -> None:
    """Run each of the comma-separated ``modes`` in turn in this pair of processes (one launch, one process-group
    set-up for all of them); each writes ``OUT_DIR/MODE/rank{r}.pt``."""
    for mode in modes.split(","):
        out = Path(out_dir) / mode
        out.mkdir(parents=True, exist_ok=True)
        run_mode(mode, out, model_dir, pairs)


def run_mode(mode: str, out: Path, model_dir: str, pairs: str) -> None:
    if mode in ("fsdp2_resume", "fsdp1_resume"):
        result = resume(model_dir, pairs, out, strategy=mode.split("_")[0])
    elif mode in ("fsdp2_export", "fsdp1_export"):
        result = sharded_export(model_dir, pairs, out, strategy=mode.split("_")[0])
    elif mode.endswith("_tied"):
        tied = tied_model(model_dir, out)
        result = one_step("fsdp2", 2, tied, pairs, out, meta_init=mode == "fsdp2_meta_tied") | {"model_dir": tied}
    elif mode == "ddp_statistics":
        from tests.callbacks_run import first_step_statistics

        values = first_step_statistics(model_dir, pairs, 2, out, devices=2, strategy="ddp")
        result = {"values": values, "rank": torch.distributed.get_rank()}
    elif mode == "fsdp2_bf16_ac":
        result = one_step("fsdp2", 2, model_dir, pairs, out, fsdp_param_dtype="bfloat16",
                          activation_checkpointing=True)
    elif mode == "fsdp2_meta":
        result = one_step("fsdp2", 2, model_dir, pairs, out, meta_init=True)
    elif mode == "fsdp2_lora":
        result = one_step("fsdp2", 2, model_dir, pairs, out, lora=LORA)
    elif mode == "fsdp2_lora_meta":
        result = one_step("fsdp2", 2, model_dir, pairs, out, lora=LORA, meta_init=True)
    elif mode == "fsdp2_chunks":
        result = one_step("fsdp2", 2, model_dir, pairs, out, chunk_size=2)
    elif mode == "fsdp2_frozen":
        result = one_step("fsdp2", 2, model_dir, pairs, out, **frozen_options(model_dir))
    elif mode == "fsdp2_aligndistil":
        dpo = tied_model(model_dir, out)
        result = one_step("fsdp2", 2, model_dir, pairs, out, **aligndistil_options(model_dir, dpo)) | {"dpo_dir": dpo}
    elif "_treg" in mode:
        layout = "packed" if mode.endswith("_packed") else "padded"
        scorer = "policy" if mode.endswith("_policy") else None
        result = one_step(mode.split("_")[0], 2, model_dir, pairs, out, layout=layout, **treg_options(scorer))
    elif mode.endswith("_reference_cache"):
        result = cached_reference_step(mode.split("_")[0], model_dir, pairs, out)
    elif mode == "ddp_budget":
        result = budget_run(model_dir, pairs, out)
    elif mode.endswith("_packed"):  # data.layout: packed (tests/test_packing.py for one process)
        result = one_step(mode.removesuffix("_packed"), 2, model_dir, pairs, out, layout="packed")
    elif mode == "fsdp2_sparse":
        result = one_step("fsdp2", 2, model_dir, pairs, out, masker=LearnedMasker(target_sparsity=0.5))
    elif mode == "fsdp2_clip":
        result = one_step("fsdp2", 2, model_dir, pairs, out, gradient_clip_val=CLIP)
    else:
        result = one_step(mode, 2, model_dir, pairs, out)
    torch.save(result, out / f"rank{result['rank']}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:5])
