"""Data-parallel training on 2 CPU processes (gloo) against a single-process run on the same global batch.

Each distributed run is ``tests/distributed_run.py`` in a subprocess (Lightning re-launches it once per rank);
the ranks write their losses and gathered weights to ``tmp_path``, compared here against the same functions
run in this process with ``devices=1``. One SGD step makes the weight update ``-lr * gradient``, so equal
updates mean equal (globally averaged) gradients: per-rank means over 2 pairs averaged over 2 ranks equal
the mean over the 4 pairs of the single-process batch.
GPU-only paths (FSDP1 ``FSDPStrategy``, ``bf16-mixed``) are at the end and skip without CUDA.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.distributed_launch import rank_env
from tests.distributed_run import CLIP, LORA, STEPS_PER_EPOCH, one_step

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def single(tiny_model_dir, pairs_file, tmp_path_factory) -> dict:
    """The baseline: one process, one SGD step on the first 4 pairs."""
    return one_step("auto", 1, tiny_model_dir, pairs_file, tmp_path_factory.mktemp("single"))


def _assert_same_step(ranks: list[dict], single: dict, rtol: float, atol: float, min_move: float = 1e-4,
                      parts: tuple[str, ...] = ("policy", "masker")) -> None:
    loss = sum(r["loss"][0] for r in ranks) / len(ranks)
    assert loss == pytest.approx(single["loss"][0], rel=1e-5)
    for r in ranks:
        assert not r["reference_training"]
        for name, value in r["after"]["reference"].items():  # frozen: bit-identical, and equal to the baseline's
            assert torch.equal(value, r["before"]["reference"][name]), f"reference changed: {name}"
            assert torch.equal(value, single["after"]["reference"][name])
        for part in parts:
            for name, value in r["after"][part].items():
                torch.testing.assert_close(value, single["after"][part][name], rtol=rtol, atol=atol,
                                           msg=lambda m, n=f"{part}.{name}": f"{n}: {m}")
    for name, value in ranks[0]["after"]["masker"].items():  # no rank drifted
        assert torch.equal(value, ranks[1]["after"]["masker"][name]), f"masker differs across ranks: {name}"
    for part in parts:  # the step did something measurable (else equality would be vacuous)
        moved = max((v - single["before"][part][k]).abs().max().item() for k, v in single["after"][part].items())
        assert moved > min_move, f"{part} did not move"


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "fsdp1", "fsdp2_meta", "ddp_packed", "fsdp2_packed"])
def test_one_step_matches_single_process(mode, single, ranks_by_mode):
    """Loss and SGD-updated weights of policy and mask network equal the 1-process run; reference frozen.

    ``fsdp1`` is Lightning's ``FSDPStrategy`` with the recipe's per-block auto-wrap and activation checkpointing,
    run on CPU (``tests.distributed_run.CPUFSDPStrategy``); ``fsdp2_meta`` builds both models on the meta device
    and loads each rank's shards after sharding (``meta_init``), against a baseline loaded by ``from_pretrained``;
    ``*_packed`` run on the packed layout (``data.layout: packed``) against the padded 1-process baseline."""
    ranks = ranks_by_mode[mode]
    _assert_same_step(ranks, single, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode, computed", [("ddp_reference_cache", [16, 16]), ("fsdp2_reference_cache", [24, 8])])
def test_cached_reference_on_two_ranks_matches_the_live_single_process(mode, computed, ranks_by_mode, tiny_model_dir,
                                                                       pairs_file, tmp_path):
    """``model.reference_cache`` on 2 gloo processes: the ranks build the cache together (rank 0 the training pairs,
    rank 1 the validation pairs; under FSDP2 in pieces of 12 pairs, so rank 1 has 8 pairs to compute against rank
    0's 24 and pads its reference calls to stay in step with the sharded reference), the step equals the
    single-process live-reference step, although under DDP rank 1 computed no training pair: it read rank 0's.
    WeightedDPO with UniformMasker (DPO); a plug-in reading the cached log-probs in its context, and a
    later start reading without computing: tests/test_reference_cache.py. Under DDP the ranks release the
    reference's weights (and the next DDP step's buffer broadcast still works); under FSDP2 they keep their shards."""
    from tests.distributed_run import cache_options

    baseline = one_step("auto", 1, tiny_model_dir, pairs_file, tmp_path, **cache_options("uniform"))
    ranks = ranks_by_mode[mode]
    assert [r["computed"] for r in ranks] == computed
    # DDP: every rank drops its whole reference once the cache serves the fit; FSDP2: each keeps its shard
    assert [r["reference_released"] for r in ranks] == [mode.startswith("ddp")] * 2
    loss = sum(r["loss"][0] for r in ranks) / len(ranks)
    assert loss == pytest.approx(baseline["loss"][0], rel=1e-6)
    for r in ranks:
        for name, value in r["after"]["policy"].items():
            torch.testing.assert_close(value, baseline["after"]["policy"][name], rtol=1e-4, atol=1e-6)
    before, after = baseline["before"]["policy"], baseline["after"]["policy"]
    assert max((v - before[k]).abs().max().item() for k, v in after.items()) > 1e-4


def test_ddp_token_budget_micro_batches_are_dealt_to_ranks(ranks_by_mode):
    """``data.max_tokens`` under DDP with Lightning's sampler injection on: the module's ``BatchOrderSampler`` is
    kept, both ranks run the 3 steps, and they see different micro-batches (rank r takes every 2nd from r). The
    tokenised cache is built by rank 0 only."""
    ranks = ranks_by_mode["ddp_budget"]
    assert [r["sampler"] for r in ranks] == ["BatchOrderSampler"] * 2
    assert [len(r["loss"]) for r in ranks] == [3, 3]
    assert set(ranks[0]["order"]).isdisjoint(ranks[1]["order"][:len(ranks[0]["order"]) - 1])
    assert not torch.equal(ranks[0]["rows"][0], ranks[1]["rows"][0])
    # tokenise once: rank 0 tokenised the 16 pairs into the cache (prepare_data), rank 1 read them
    assert [r["tokenised"] for r in ranks] == [16, 0]


def test_fsdp2_ranks_with_different_numbers_of_head_chunks(single, ranks_by_mode):
    """``chunk_size=2``: the two ranks' batches have different response lengths, so they apply the sharded LM
    head (an FSDP2 unit: every call is a collective) a different number of times; the step must neither hang nor
    differ from the single-process run (chunking does not change the numbers)."""
    _assert_same_step(ranks_by_mode["fsdp2_chunks"], single, rtol=1e-4, atol=1e-6)


def test_fsdp2_plugin_with_extra_frozen_models(ranks_by_mode, tiny_model_dir, pairs_file, tmp_path):
    """A token-weighting plug-in reading two extra frozen models (TIS-DPO) under FSDP2: the frozen models are
    sharded like the reference, stay frozen, and the step equals the single-process run."""
    from tests.distributed_run import frozen_options

    baseline = one_step("auto", 1, tiny_model_dir, pairs_file, tmp_path / "single", **frozen_options(tiny_model_dir))
    ranks = ranks_by_mode["fsdp2_frozen"]
    assert all(r["frozen_sharded"] for r in ranks) and baseline["frozen_sharded"] is False
    loss = sum(r["loss"][0] for r in ranks) / len(ranks)
    assert loss == pytest.approx(baseline["loss"][0], rel=1e-5)
    for r in ranks:
        for name, value in r["after"]["policy"].items():
            torch.testing.assert_close(value, baseline["after"]["policy"][name], rtol=1e-4, atol=1e-6)


def test_fsdp2_full_distribution_statistic_matches_single_process(ranks_by_mode, tiny_model_dir, pairs_file,
                                                                  tmp_path):
    """AlignDistil's divergence (full distributions of policy, reference and two extra frozen models) under FSDP2
    with 2-token chunks, the ranks holding different numbers of response tokens: no hang, and loss and updated
    policy equal the single-process run."""
    from tests.distributed_run import aligndistil_options

    ranks = ranks_by_mode["fsdp2_aligndistil"]
    single = one_step("auto", 1, tiny_model_dir, pairs_file, tmp_path / "single",
                      **aligndistil_options(tiny_model_dir, ranks[0]["dpo_dir"]))
    assert sum(r["loss"][0] for r in ranks) / len(ranks) == pytest.approx(single["loss"][0], rel=1e-5)
    assert single["loss"][0] > 1e-4  # the teacher differs from the policy: a step that can differ
    for r in ranks:
        for name, value in r["after"]["policy"].items():
            torch.testing.assert_close(value, single["after"]["policy"][name], rtol=1e-4, atol=1e-6)
    moved = max((v - single["before"]["policy"][k]).abs().max().item() for k, v in single["after"]["policy"].items())
    assert moved > 1e-5


@pytest.mark.parametrize("mode", ["fsdp2_tied", "fsdp2_meta_tied"])
def test_fsdp2_tied_embeddings_match_single_process(mode, ranks_by_mode, pairs_file, tmp_path):
    """Tied input embedding / LM head (SmolLM2, GPT-2): one FSDP group holds both, the step equals 1 process;
    with ``meta_init`` the tie survives the meta-device build and the shard-wise load."""
    from transformers import AutoModelForCausalLM

    ranks = ranks_by_mode[mode]
    model = AutoModelForCausalLM.from_pretrained(ranks[0]["model_dir"])  # the tiny Llama the ranks trained
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    single = one_step("auto", 1, ranks[0]["model_dir"], pairs_file, tmp_path / "single")
    _assert_same_step(ranks, single, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["fsdp2_lora", "fsdp2_lora_meta", "fsdp2_clip"])
def test_fsdp2_lora_and_gradient_clipping_match_single_process(mode, ranks_by_mode, tiny_model_dir, pairs_file,
                                                              tmp_path):
    """LoRA (reference = adapters off, no second model) and global-norm clipping under FSDP2 equal 1 process;
    LoRA with ``meta_init`` (adapters initialised at once, base weights loaded per shard) against the same in
    one process (the adapters' random init is drawn in another order than without ``meta_init``)."""
    options = {"gradient_clip_val": CLIP} if mode == "fsdp2_clip" else {"lora": LORA}
    if mode == "fsdp2_lora_meta":
        options["meta_init"] = True
    single = one_step("auto", 1, tiny_model_dir, pairs_file, tmp_path / "single", **options)
    ranks = ranks_by_mode[mode]
    _assert_same_step(ranks, single, rtol=1e-4, atol=1e-6, min_move=5e-6)  # LoRA meta: max move ~1e-5
    if mode == "fsdp2_clip":  # clipping was active: the SGD step is -lr * (clipped gradient + wd * p), lr 0.1, where
        # only the mask weights decay (model.mask_weight_decay 0.01); without the decay term, the step's norm is
        # exactly lr * max_norm (unclipped, this step's gradient norm is more than twice max_norm).
        parts = ("policy", "masker")
        after, before = ranks[0]["after"], ranks[0]["before"]
        decay = {k: 0.01 for k in after["masker"] if k.endswith(("layer_weight", "mixer_weight"))}
        step = torch.cat([(v - before[p][k] + 0.1 * (decay.get(k, 0.0) if p == "masker" else 0.0) * before[p][k])
                          .flatten() for p in parts for k, v in after[p].items()])
        assert step.norm().item() == pytest.approx(0.1 * CLIP, rel=1e-3)
    if mode.startswith("fsdp2_lora"):
        before = ranks[0]["before"]["policy"]
        changed = {k for k, v in ranks[0]["after"]["policy"].items() if not torch.equal(v, before[k])}
        assert changed and all("lora_" in k for k in changed), sorted(changed)


def test_fsdp2_bf16_compute_and_activation_checkpointing(single, ranks_by_mode):
    """bf16 compute with fp32 reductions + per-block activation checkpointing: close to the fp32 step."""
    ranks = ranks_by_mode["fsdp2_bf16_ac"]
    assert ranks[0]["checkpointed_blocks"] == 2 and set(ranks[0]["block_dtypes"]) == {torch.bfloat16}
    assert single["checkpointed_blocks"] == 0 and set(single["block_dtypes"]) == {torch.float32}
    loss = sum(r["loss"][0] for r in ranks) / 2
    assert loss == pytest.approx(single["loss"][0], rel=2e-2)
    for part in ("policy", "masker"):  # the update points the same way as the fp32 one (bf16 rounds ~3 digits)
        update = torch.cat([(v - ranks[0]["before"][part][k]).flatten() for k, v in ranks[0]["after"][part].items()])
        ref = torch.cat([(v - single["before"][part][k]).flatten() for k, v in single["after"][part].items()])
        assert torch.nn.functional.cosine_similarity(update, ref, dim=0) > 0.98, part
        assert update.norm() == pytest.approx(ref.norm().item(), rel=0.05)


@pytest.mark.parametrize("strategy", ["fsdp2", "fsdp1"])
def test_sharded_checkpoint_holds_policy_masks_and_optimizer(strategy, ranks_by_mode):
    """The distributed checkpoint saved after epoch 1 on 2 ranks (``distributed_run.resume``) is a folder with the
    policy, masks and optimizer state. FSDP2 checkpoints leave the frozen reference out; FSDP1 ones keep it (its
    flat-parameter units load every key before any hook can add them back; ``PreferenceModule.on_save_checkpoint``).
    """
    from torch.distributed.checkpoint import FileSystemReader

    ranks = ranks_by_mode[f"{strategy}_resume"]
    ckpt = Path(ranks[0]["checkpoint"])
    assert ckpt.is_dir() and (ckpt / "meta.pt").is_file()
    keys = FileSystemReader(ckpt).read_metadata().state_dict_metadata.keys()
    root = "state_dict" if strategy == "fsdp2" else "model"
    has_reference = any(k.startswith(f"{root}.reference.") for k in keys)
    assert has_reference == (strategy == "fsdp1"), f"reference saved: {has_reference}"
    assert any(k.startswith(f"{root}.masker.") for k in keys) and any(k.startswith("optimizer_0") for k in keys)
    for r in ranks:
        assert len(r["part1"]) == STEPS_PER_EPOCH and len(r["full"]) == 2 * STEPS_PER_EPOCH
        assert r["part1"] == pytest.approx(r["full"][:STEPS_PER_EPOCH], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("strategy", ["fsdp2", "fsdp1"])
def test_sharded_checkpoint_resumes_exactly(strategy, ranks_by_mode):
    """Resumed from the checkpoint saved after epoch 1 on 2 ranks (after the fit stopped at the epoch end): the same
    losses as the uninterrupted run (Lightning 2.6 alone replays one batch and shifts the passes;
    ``checkpointing.close_saved_epoch``)."""
    for r in ranks_by_mode[f"{strategy}_resume"]:
        assert r["part1"] + r["resumed"] == pytest.approx(r["full"], rel=1e-5, abs=1e-6)


PRESET_ON_CPU = {  # the only changes to the shipped presets: CPU, 2 processes
    "fsdp1": ["--trainer.strategy.class_path", "tests.distributed_run.CPUFSDPStrategy"],
    "fsdp2": ["--trainer.strategy.init_args.data_parallel_size", "2"],
}


INTERRUPT = {"fsdp1": (signal.SIGUSR1, 1), "fsdp2": (signal.SIGTERM, 0)}
"""Per preset: the signal that stops its first run, and the one rank it is sent to."""
COMPARED = "fsdp2"
"""The preset whose interrupted run is resumed and compared with an uninterrupted one (two more 2-process launches;
the other preset's sharded resume is ``test_sharded_checkpoint_resumes_exactly``)."""


@pytest.mark.parametrize("preset", sorted(PRESET_ON_CPU))
def test_distributed_preset_runs_as_shipped_on_cpu_stops_on_a_signal_and_resumes_step_exact(
        preset, cli_zygote, tiny_model_dir, pairs_file, tmp_path):  # fmt: skip
    """``configs/distributed/<preset>.yaml`` on top of a recipe, as the README launches it, on 2 CPU processes.

    fsdp1: auto-wrap + activation checkpointing on the block class, sharded state dict, ``bf16-mixed`` (FSDP1
    keeps bf16 parameter copies, so the fp32 mask networks see bf16 weights); the strategy is its CPU subclass.
    fsdp2: bf16 compute with fp32 reduction, activation checkpointing, ``meta_init`` (each rank loads its shards).

    The first run gets a signal before step 2, sent to one rank alone (fsdp2: SIGTERM to the launcher, rank 0;
    fsdp1: SIGUSR1 to rank 1, which Lightning started): both ranks finish step 2 and stop there, the launcher exits
    143 / 138 (the signal rank 1 received) once rank 1 has ended, leaving a sharded ``last.ckpt`` folder and
    ``summary.json`` at step 2. fsdp2: ``--ckpt_path last`` resumes it to step 6, mid-epoch and across the epoch end
    (16 pairs, 2 per rank: 4 steps per epoch), and every rank's per-step losses and the final checkpoint (weights,
    masks, optimizer state) equal those of an uninterrupted 6-step run bit for bit (exact comparison, no tolerance).
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from tests.test_checkpointing import _losses
    from tests.test_interrupt import _callbacks, _ended, _wait_for

    def command(runs: Path, config: Path, *extra: str) -> list[str]:
        return ["fit", "--config", "configs/debug/tiny.yaml", "--config", f"configs/distributed/{preset}.yaml",
                "--config", str(config), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                *PRESET_ON_CPU[preset], "--model.model", tiny_model_dir, "--data.train_file", pairs_file,
                "--data.val_file", pairs_file, "--trainer.logger.init_args.save_dir", str(runs),
                "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "6", *extra]

    # rank 0 is forked from the zygote; Lightning starts rank 1 as `python -m sparsepo_lightning.cli ...`
    logs = {name: str(tmp_path / f"{name}{{rank}}.jsonl") for name in ("full", "first", "resumed")}
    if preset == COMPARED:
        full = cli_zygote.start(*command(tmp_path / "full", _callbacks(tmp_path / "full.yaml", logs["full"])),
                                env=rank_env(), timeout=300)
    signum, target = INTERRUPT[preset]
    runs, marker = tmp_path / "runs", str(tmp_path / "pause{rank}")
    first = cli_zygote.start(*command(runs, _callbacks(tmp_path / "first.yaml", logs["first"], (1, marker))),
                             env={**rank_env(), "SLURM_JOB_ID": ""}, timeout=300)  # never requeue a job around pytest
    markers = [Path(marker.format(rank=r)) for r in range(2)]
    _wait_for(markers, first, time.monotonic() + 240)  # both ranks before step 2
    pids = [int(m.read_text()) for m in markers]
    os.kill(pids[target], signum)
    for m in markers:
        m.unlink()
    name, out = signal.Signals(signum).name, lambda proc: f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert first.wait() == 128 + signum, out(first)
    assert _ended(pids[1]), "the launcher exited before rank 1"
    assert f"Interrupted by {name} at step 2" in first.stderr, out(first)
    checkpoints = runs / "debug" / "version_0" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_dir() and (checkpoints / "last.ckpt" / "meta.pt").is_file()  # sharded
    assert torch.load(checkpoints / "last.ckpt" / "meta.pt", weights_only=True)["global_step"] == 2
    assert json.loads((checkpoints.parent / "summary.json").read_text())["global_step"] == 2
    if preset != COMPARED:
        return
    resumed = cli_zygote.run(*command(runs, _callbacks(tmp_path / "resumed.yaml", logs["resumed"]),
                                      "--ckpt_path", "last"), env=rank_env(), timeout=300)
    assert resumed.returncode == 0, out(resumed)
    assert f"resuming from {checkpoints / 'last.ckpt'}" in resumed.stderr + resumed.stdout
    final = runs / "debug" / "version_1" / "checkpoints" / "last.ckpt" / "meta.pt"
    assert torch.load(final, weights_only=True)["global_step"] == 6
    pieces = [[row for log in (logs["first"], logs["resumed"]) for row in _losses(Path(log.format(rank=rank)))]
              for rank in range(2)]
    assert [[r["step"] for r in rows] for rows in pieces] == [list(range(1, 7))] * 2
    assert full.wait() == 0, out(full)
    for rank in range(2):
        assert [r["loss"] for r in pieces[rank]] == [r["loss"] for r in _losses(Path(logs["full"].format(rank=rank)))]
    states = []
    for folder, version in ((runs, "version_1"), (tmp_path / "full", "version_0")):
        dcp_to_torch_save(folder / "debug" / version / "checkpoints" / "last.ckpt", tmp_path / f"{version}.pt")
        states.append(_tensors(torch.load(tmp_path / f"{version}.pt", weights_only=True)))
    assert states[0].keys() == states[1].keys() and any(".masker." in k for k in states[0])
    for key, value in states[1].items():
        assert torch.equal(states[0][key], value), key


def _tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a nested checkpoint dict, by their dotted path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list | tuple) else ()
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}.{key}" if prefix else str(key)).items()}


# ---- GPU-only paths: FSDP1 (FSDPStrategy) and bf16-mixed; skipped without CUDA ---------------------------------
def needs_cuda(test):
    """Marked ``gpu`` (``pytest -m gpu``, run by ``make gpu-check``) and skipped without CUDA."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDPStrategy and bf16-mixed need a CUDA GPU")
    return pytest.mark.gpu(skip(test))


@needs_cuda
def test_fsdp1_bf16_mixed_one_step_and_sharded_checkpoint(tiny_model_dir, pairs_file, tmp_path):
    """FSDPStrategy with per-block auto-wrap and activation checkpointing, bf16-mixed: a finite step, a frozen
    reference, a sharded checkpoint directory; peak memory is printed for the README."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from tests.distributed_run import LossRecorder, make_data, make_module, snapshot

    module = make_module(tiny_model_dir, optimizer=torch.optim.AdamW, lr=1e-3)
    reference_before = {k: v.clone().float() for k, v in module.reference.state_dict().items()}
    strategy = FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, activation_checkpointing_policy={LlamaDecoderLayer},
                            state_dict_type="sharded", use_orig_params=True)  # frozen + trainable share a unit
    recorder = LossRecorder()
    trainer = Trainer(accelerator="cuda", devices=1, strategy=strategy, precision="bf16-mixed", max_steps=2,
                      limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, default_root_dir=tmp_path, callbacks=[recorder])
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=make_data(tiny_model_dir, pairs_file, batch_size=2))
    print(f"fsdp1 bf16-mixed peak memory: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
    assert len(recorder.losses) == 2 and all(torch.isfinite(torch.tensor(recorder.losses)))
    reference_after = snapshot(module)["reference"]  # gathered under summon_full_params, unwrapped names
    assert reference_after.keys() == reference_before.keys()
    for name, value in reference_after.items():
        torch.testing.assert_close(value.cpu(), reference_before[name])
    trainer.save_checkpoint(tmp_path / "sharded")
    assert (tmp_path / "sharded").is_dir()


@needs_cuda
def test_fsdp2_bf16_mixed_one_step_on_gpu(tiny_model_dir, pairs_file, tmp_path):
    """ModelParallelStrategy on one GPU with FSDP2 bf16 compute and trainer bf16-mixed autocast: finite steps."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import ModelParallelStrategy

    from tests.distributed_run import LossRecorder, make_data, make_module

    module = make_module(tiny_model_dir, optimizer=torch.optim.AdamW, lr=1e-3, fsdp_param_dtype="bfloat16",
                         activation_checkpointing=True)
    recorder = LossRecorder()
    trainer = Trainer(accelerator="cuda", devices=1, strategy=ModelParallelStrategy(data_parallel_size=1,
                      tensor_parallel_size=1), precision="bf16-mixed", max_steps=2, limit_val_batches=0,
                      num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      default_root_dir=tmp_path, callbacks=[recorder])
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=make_data(tiny_model_dir, pairs_file, batch_size=2))
    print(f"fsdp2 bf16 peak memory: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
    assert len(recorder.losses) == 2 and all(torch.isfinite(torch.tensor(recorder.losses)))


def test_fsdp2_target_sparsity_matches_single_process(ranks_by_mode, tiny_model_dir, pairs_file, tmp_path):
    """A learned mask at a target sparsity under FSDP2: the gate is sharded with the mask network (each rank's
    gradient all-reduced) and, having no statistic across responses, the step equals one process on both halves."""
    from sparsepo_lightning.masks import LearnedMasker

    single = one_step("auto", 1, tiny_model_dir, pairs_file, tmp_path / "single",
                      masker=LearnedMasker(target_sparsity=0.5))
    assert "reward_gate" in single["after"]["masker"]
    _assert_same_step(ranks_by_mode["fsdp2_sparse"], single, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def treg_single(tiny_model_dir, pairs_file, tmp_path_factory) -> dict[str, dict]:
    """T-REG's single-process baseline per layout: one SGD step on the first 4 pairs (``treg_options``)."""
    from tests.distributed_run import treg_options

    return {layout: one_step("auto", 1, tiny_model_dir, pairs_file, tmp_path_factory.mktemp(f"treg-{layout}"),
                             layout=layout, **treg_options()) for layout in ("padded", "packed")}


@pytest.mark.parametrize("mode", ["ddp_treg", "fsdp2_treg", "ddp_treg_packed", "fsdp2_treg_packed",
                                  "fsdp2_treg_policy"])
def test_treg_prompt_variants_on_two_ranks_match_single_process(mode, treg_single, ranks_by_mode):
    """T-REG (``configs/methods/treg.yaml`` on the tiny recipe's row lengths) under DDP and FSDP2, padded and packed:
    each rank's batch carries its own pairs' two contrastive prompt variants, scored by the (sharded) reference in
    2-token chunks (the ranks hold different numbers of response tokens, so they must agree on the number of head
    calls). ``fsdp2_treg_policy``: ``scorer: policy``, the sharded policy runs a second, gradient-free forward on the
    variant rows before backward (at the first step it equals the reference, so the baseline is the same).

    Loss and SGD-updated policy equal one process on the same 4 pairs in the same layout (float32; loss rel 1e-5,
    weights rtol 1e-4 / atol 1e-6, as the other one-step checks), the reference stays frozen, and so do the T-REG
    metrics that are per-pair means (the ranks' average is the global mean): rel 2e-4, as ``r̂ = σ(a − b) − ½`` of two
    nearly equal log-probs (a − b ~ 1e-3 on the random tiny model) keeps only ~4 digits of float32 rounding (the
    sharded head's chunked path differs from the fused one by ~3e-5). Variant rows dealt to the wrong pairs on the
    ranks move the loss by ~6e-4 and the regulariser by ~40%."""
    from tests.distributed_run import treg_options

    single = treg_single["packed" if mode.endswith("_packed") else "padded"]
    ranks = ranks_by_mode[mode]
    assert all(r["after"]["masker"] == {} for r in (*ranks, single))  # treg.yaml: no masker
    _assert_same_step(ranks, single, rtol=1e-4, atol=1e-6, parts=("policy",))
    for name in ("regulariser", "sequence_weight"):
        key = f"train/treg/{name}"
        assert sum(r["metrics"][key] for r in ranks) / 2 == pytest.approx(single["metrics"][key], rel=2e-4), key
    # the contrastive prompts score the responses differently (else T-REG is DPO and the checks above would not see
    # variant rows dealt to the wrong pairs): α·regulariser moves the loss ~100 times its tolerance
    alpha = treg_options()["objective"].alpha
    assert abs(alpha * single["metrics"]["train/treg/regulariser"]) > 50 * 1e-5 * single["loss"][0]
