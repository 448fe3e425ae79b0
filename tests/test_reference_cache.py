"""``model.reference_cache``: the cached reference label log-probs (``sparsepo_lightning/reference_cache.py``).

By hand: the row-id lookup against a naive per-row loop, the declarations that refuse the option. Exactness: a fit
with the cache equals the live-reference fit (losses, metrics, weights; float32, padded and packed layouts, gradient
accumulation, shuffled batches, validation), resuming from a checkpoint equals the uninterrupted run, and the
reference never runs in a step. The key: a change of the data, the reference, an option or the code gives another
folder. Building: an interrupted build computes only the missing pieces; two ranks share the work and the second
reads without computing. Two gloo processes (DDP and FSDP2): ``tests/test_distributed.py``
(``*_reference_cache`` modes).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.testing import assert_close

from sparsepo_lightning import checks, reference_cache, reference_release
from sparsepo_lightning.data import PreferenceDataModule
from sparsepo_lightning.data.collate import WithRowIds, collate_pairs
from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.masks import ActivationMasker, LearnedMasker, UniformMasker
from sparsepo_lightning.methods.aligndistil import AlignDistil
from sparsepo_lightning.methods.rho1 import ExcessLossSelection
from sparsepo_lightning.methods.treg import TREG
from sparsepo_lightning.module import PreferenceModule
from sparsepo_lightning.objectives import BCO, DPO, DPOP, IPO, TDPO1, TDPO2, SimPO, SparsePO, WeightedDPO
from sparsepo_lightning.types import PreferenceBatch

# -- declarations and the lookup, by hand ------------------------------------------------------------------------


@pytest.mark.parametrize("objective, masker", [
    (DPO(), None), (IPO(), None), (DPOP(), None), (BCO(), None), (WeightedDPO(), UniformMasker()),
    (WeightedDPO(), ExcessLossSelection())])
def test_objectives_reading_label_log_probs_are_cacheable(objective, masker):
    assert reference_cache.check_cacheable(objective, masker) == ("reference_logps",)


@pytest.mark.parametrize("objective, masker, reason", [
    (TDPO1(), None, r"TDPO1 reads the reference's full next-token distribution.*reference_cache: false"),
    (TDPO2(), None, r"TDPO2 reads the reference's full next-token distribution"),
    (SparsePO(), UniformMasker(), r"SparsePO reads the reference's full next-token distribution"),
    (SimPO(), None, r"SimPO is reference-free; there is no reference to cache"),
    (WeightedDPO(), LearnedMasker(), r"masker LearnedMasker reads its block outputs.*reference_cache: false"),
    (WeightedDPO(), ActivationMasker(), r"masker ActivationMasker reads its live outputs"),
    (AlignDistil(), None, r"AlignDistil reads full next-token distributions \(distribution_statistics: "),
    (TREG(), None, r"TREG reads log-probs under extra prompt renderings \(prompt_variants: "),
])
def test_objectives_and_maskers_needing_the_live_reference_are_refused_with_the_reason(objective, masker, reason):
    with pytest.raises(ConfigError, match=reason):
        reference_cache.check_cacheable(objective, masker)


def test_module_refuses_the_option_before_loading_any_model():
    with pytest.raises(ConfigError, match="TDPO1 reads the reference's full"):
        PreferenceModule(model="/nonexistent/model", objective=TDPO1(), reference_cache=True)


def test_a_masker_declaring_a_field_the_cache_cannot_hold_is_refused():
    class Entropy(UniformMasker):
        needs_reference = True
        reference_cache_fields = ("reference_entropy",)

    with pytest.raises(ConfigError, match="reference_entropy declared cacheable, but the cache holds only "
                                          "reference_logps"):
        reference_cache.check_cacheable(WeightedDPO(), Entropy())


def _pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict[str, list[int]]:
    return {"chosen_input_ids": prompt + chosen, "chosen_labels": [-100] * len(prompt) + chosen,
            "rejected_input_ids": prompt + rejected, "rejected_labels": [-100] * len(prompt) + rejected}


def _hand_cache(folder: Path, values: dict[int, list[float]], rows: int) -> reference_cache.ReferenceCache:
    folder.mkdir(parents=True)
    order = sorted(values)
    reference_cache._write_table(folder / "train.arrow", order, [np.asarray(values[i], np.float32) for i in order])
    (folder / "meta.json").write_text(json.dumps({"format": reference_cache.FORMAT, "sides": 2,
                                                  "splits": {"train": rows}}))
    return reference_cache.ReferenceCache(folder)


def test_lookup_by_row_id_equals_a_per_row_loop_in_any_batch_order(tmp_path):
    """Three pairs; cache row ``2i`` is pair i's chosen response, ``2i + 1`` its rejected one, one value per response
    token. A batch of pairs (2, 0) in that order: rows c2, c0, r2, r0, each value at its response token."""
    features = [_pair([1, 2], [3], [4, 5]), _pair([1], [6, 7, 8], [9]), _pair([2, 2, 2], [5, 5], [6])]
    values = {0: [-0.5], 1: [-1.0, -1.5], 2: [-2.0, -2.5, -3.0], 3: [-3.5], 4: [-4.0, -4.5], 5: [-5.0]}
    cache = _hand_cache(tmp_path / "cache", values, rows=3)
    batch = collate_pairs(WithRowIds(features).__getitems__([2, 0]), pad_token_id=0)
    assert batch.row_ids == (2, 0)
    _, response_mask = batch.shifted_labels()
    got = cache.reference_logps("train", batch, response_mask)
    # shifted layout: column t scores token t + 1; c2 = [2, 2, 2, 5, 5] -> columns 2, 3
    expected = torch.zeros(4, 4)
    expected[0, 2:4] = torch.tensor([-4.0, -4.5])  # c2
    expected[1, 1] = -0.5  # c0 = [1, 2, 3]
    expected[2, 2] = -5.0  # r2 = [2, 2, 2, 6]
    expected[3, 1:3] = torch.tensor([-1.0, -1.5])  # r0 = [1, 2, 4, 5]
    assert torch.equal(got, expected)
    naive = torch.zeros_like(got)  # the per-row loop the vectorised gather replaces
    for row, (pair, side) in enumerate([(2, 0), (0, 0), (2, 1), (0, 1)]):
        naive[row, response_mask[row]] = torch.tensor(values[2 * pair + side])
    assert torch.equal(got, naive)


def test_lookup_rejects_batches_without_row_ids_or_with_other_rows(tmp_path):
    cache = _hand_cache(tmp_path / "cache", {0: [-0.5], 1: [-1.0, -1.5]}, rows=1)
    batch = collate_pairs([_pair([1, 2], [3], [4, 5])], pad_token_id=0)
    with pytest.raises(ConfigError, match="carries no row ids.*WithRowIds"):
        cache.reference_logps("train", batch, batch.shifted_labels()[1])
    batch = collate_pairs(WithRowIds([_pair([1, 2], [3], [4, 5])] * 2).__getitems__([1]), pad_token_id=0)
    with pytest.raises(ConfigError, match=r"batch rows \(1,\) do not match the cached train split \(1 rows"):
        cache.reference_logps("train", batch, batch.shifted_labels()[1])
    other = PreferenceBatch(**{**vars(collate_pairs([_pair([1], [3, 3], [4])], 0)), "row_ids": (0,)})
    with pytest.raises(ConfigError, match=r"hold \[1 2\] values but the batch has \[2 1\] response tokens"):
        cache.reference_logps("train", other, other.shifted_labels()[1])


# -- exactness against the live reference ------------------------------------------------------------------------


class _Record(Callback):
    """Per-step metrics (train and validation), and a hook that counts the reference's forwards in steps (not in the
    packed layout's one-time start-up probe, ``checks.check_packed_layout``, which runs every model on a probe)."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, torch.Tensor]] = []
        self.reference_calls = 0
        self.probing = False

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.reference.base_model.register_forward_pre_hook(lambda *_: self._count())

    def _count(self) -> None:
        self.reference_calls += not self.probing

    def probe(self, check):
        def probing(*args):
            self.probing = True
            try:
                return check(*args)
            finally:
                self.probing = False
        return probing

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.append(dict(pl_module.last_step.metrics))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.metrics.append({f"val:{k}": v for k, v in pl_module.last_step.metrics.items()})


@pytest.fixture(scope="module")
def other_reference(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny Llama with other weights (seed 1) and the same tokenizer: a reference that is not the policy."""
    from transformers import AutoTokenizer

    from tests.tiny_models import tiny_llama

    folder = tmp_path_factory.mktemp("other-reference")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_llama(seed=1, vocab=len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _fit(model_dir: str, pairs_file: str, root: Path, cache: bool, layout: str = "padded", max_steps: int = 2,
         resume: str | None = None, checkpoint: bool = False,
         reference: str | None = None) -> tuple[_Record, dict[str, torch.Tensor], Any]:
    """SGD, 2 optimizer steps of 2 accumulated (shuffled) micro-batches of 2 pairs, validation on 2 batches.

    With a ``reference`` other than the policy: WeightedDPO with ExcessLossSelection, a plug-in that reads the
    (cached) reference log-probs. Else WeightedDPO with ``UniformMasker`` (DPO): with the policy as reference every
    ``ρ^t`` is exactly 0 at the first step, and the tokens ExcessLossSelection keeps would be chosen by float
    rounding (the cache's rows are batched differently from the step's)."""
    seed_everything(0)
    weights = ExcessLossSelection(keep_ratio=0.5, scope="response") if reference else UniformMasker()
    module = PreferenceModule(model=model_dir, reference=reference, objective=WeightedDPO(beta=0.5), masker=weights,
                              optimizer=torch.optim.SGD, lr=0.5, warmup_ratio=0.0, schedule="constant",
                              reference_cache=cache)
    data = PreferenceDataModule(tokenizer=model_dir, train_file=pairs_file, val_file=pairs_file, batch_size=2,
                                max_length=32, max_prompt_length=16, layout=layout)
    record = _Record()
    callbacks = [record] + ([ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_train_steps=1)]
                            if checkpoint else [])
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=2, logger=False,
                      enable_checkpointing=checkpoint, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=2, num_sanity_val_steps=0, val_check_interval=4, default_root_dir=root,
                      callbacks=callbacks)
    with mock.patch.object(checks, "check_packed_layout", record.probe(checks.check_packed_layout)):
        trainer.fit(module, datamodule=data, ckpt_path=resume)
    return record, {k: v.detach().clone() for k, v in module.policy.named_parameters()}, module


def _assert_same_run(cached: tuple, live: tuple, rtol: float, atol: float) -> None:
    (record, weights, _), (live_record, live_weights, _) = cached, live
    assert len(record.metrics) == len(live_record.metrics) > 4  # 4 training micro-batches and 2 validation batches
    for step, (got, want) in enumerate(zip(record.metrics, live_record.metrics, strict=True)):
        assert got.keys() == want.keys()
        for name in want:
            assert_close(got[name], want[name], rtol=rtol, atol=atol,
                         msg=lambda m, n=name, s=step: f"{s} {n}: {m}")
    for name, value in live_weights.items():
        assert_close(weights[name], value, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture(scope="module")
def live_padded(tiny_model_dir, pairs_file, other_reference, tmp_path_factory) -> tuple:
    """The live-reference run on the padded layout (ExcessLossSelection), shared by the exactness and resume tests."""
    return _fit(tiny_model_dir, pairs_file, tmp_path_factory.mktemp("live"), cache=False, reference=other_reference)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_cached_fit_equals_the_live_reference_fit(layout, tiny_model_dir, pairs_file, other_reference, tmp_path,
                                                 monkeypatch, live_padded):
    """Losses, metrics (train and validation) and weights after 2 accumulated steps, to 1e-6; the reference runs
    only while the cache is built, never in a step.

    Padded: ExcessLossSelection with another model as the reference. Packed: DPO (policy = reference). The cache is
    computed on padded rows; on the packed layout the live reference's log-probs differ from them by float rounding
    (~1e-7), and the sequence log-ratios (differences of two sums of ~20 token log-probs) with them: there the
    tolerance is the one of the packed layout against the padded one, both live (tests/test_packing.py): 1e-6
    absolute plus 1e-5 relative."""
    monkeypatch.setenv("SPARSEPO_TOKENISED_CACHE", str(tmp_path / "cache"))
    reference = other_reference if layout == "padded" else None
    live = live_padded if layout == "padded" else _fit(tiny_model_dir, pairs_file, tmp_path / "live", cache=False,
                                                       layout=layout)
    cached = _fit(tiny_model_dir, pairs_file, tmp_path / "cached", cache=True, layout=layout, reference=reference)
    assert live[0].reference_calls >= 6 and cached[0].reference_calls == 0
    assert cached[2]._cache.cache.rows_computed == 32  # 16 training and 16 validation pairs
    moved = max((live[1][k] - v).abs().max().item() for k, v in _initial_policy(tiny_model_dir).items())
    assert moved > 1e-4  # the steps did something measurable
    _assert_same_run(cached, live, rtol=0 if layout == "padded" else 1e-5, atol=1e-6)
    assert reference_release.released(cached[2].reference) and not reference_release.released(live[2].reference)
    if layout == "padded":
        _assert_a_test_stage_loads_the_released_reference_again(cached[2], live[2], tiny_model_dir, pairs_file)


def _assert_a_test_stage_loads_the_released_reference_again(cached: PreferenceModule, live: PreferenceModule,
                                                             model_dir: str, pairs_file: str) -> None:
    """After the fit the cached module holds no reference weights; ``trainer.test`` (a split the cache does not
    hold) loads them again and scores as the module whose reference stayed loaded."""
    losses = []
    for module in (cached, live):
        data = PreferenceDataModule(tokenizer=model_dir, train_file=pairs_file, test_file=pairs_file, batch_size=2,
                                    max_length=32, max_prompt_length=16)
        trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_test_batches=2)
        losses.append(trainer.test(module, datamodule=data, verbose=False)[0])
    assert not reference_release.released(cached.reference)
    for name, value in live.reference.state_dict().items():
        assert torch.equal(cached.reference.state_dict()[name], value), name
    assert losses[0].keys() == losses[1].keys() and losses[0]
    for name, value in losses[1].items():
        assert losses[0][name] == pytest.approx(value, abs=1e-6), name


def test_the_reference_weights_stay_where_a_callback_or_a_shard_needs_them():
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    from sparsepo_lightning.callbacks import GenerationSamples
    from tests.tiny_models import tiny_llama

    def module(sharded: bool = False) -> SimpleNamespace:
        return SimpleNamespace(reference=tiny_llama(seed=0, vocab=64), _sharded=sharded)

    single, ddp = SingleDeviceStrategy(device=torch.device("cpu")), DDPStrategy()
    kept = module()
    note = reference_release.release(kept, SimpleNamespace(strategy=single, callbacks=[GenerationSamples()]))
    assert note == "reference weights kept: GenerationSamples reads the reference during the fit"
    assert not reference_release.released(kept.reference)
    sharded = module(sharded=True)
    assert reference_release.release(sharded, SimpleNamespace(strategy=ddp, callbacks=[])) == \
        "reference weights kept: each rank holds its shard"
    free = module()
    size = sum(p.numel() * p.element_size() for p in free.reference.parameters())
    note = reference_release.release(free, SimpleNamespace(strategy=ddp, callbacks=[_Record()]))
    assert note.startswith("reference weights released (") and reference_release.released(free.reference)
    assert all(p.numel() == 0 for p in free.reference.parameters()) and size > 0
    assert all(b.numel() > 0 for b in free.reference.buffers())  # DDP broadcasts buffers at every step
    free.reference.to(torch.float64).cpu()  # Lightning moves the module at the end of a fit
    assert reference_release.release(free, SimpleNamespace(strategy=ddp, callbacks=[])) == ""  # once
    assert reference_release.release(SimpleNamespace(reference=None), SimpleNamespace(strategy=ddp)) == ""


def _initial_policy(model_dir: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())


def test_resume_with_the_cache_equals_the_uninterrupted_live_run(tiny_model_dir, pairs_file, other_reference, tmp_path,
                                                                 monkeypatch, live_padded):
    """Stop after step 1 (checkpoint), resume to step 2: the weights equal the live run's; the resumed start reads
    the cache without computing."""
    monkeypatch.setenv("SPARSEPO_TOKENISED_CACHE", str(tmp_path / "cache"))
    live = live_padded
    first = _fit(tiny_model_dir, pairs_file, tmp_path / "run", cache=True, max_steps=1, checkpoint=True,
                 reference=other_reference)
    assert first[2]._cache.cache.rows_computed == 32
    checkpoint = next((tmp_path / "run" / "ckpt").glob("*step=1.ckpt"))
    resumed = _fit(tiny_model_dir, pairs_file, tmp_path / "run", cache=True, resume=str(checkpoint),
                   reference=other_reference)
    assert resumed[2]._cache.cache.rows_computed == 0
    for name, value in live[1].items():
        assert_close(resumed[1][name], value, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert_close(resumed[0].metrics[-1]["val:loss"], live[0].metrics[-1]["val:loss"], rtol=0, atol=1e-6)


# -- the key, resumable builds, ranks ----------------------------------------------------------------------------


def _module_and_data(model_dir: str, pairs_file: str, **options) -> tuple[PreferenceModule, PreferenceDataModule]:
    module = PreferenceModule(model=model_dir, objective=DPO(), reference_cache=True, **options)
    data = PreferenceDataModule(tokenizer=model_dir, train_file=pairs_file, val_file=pairs_file, batch_size=3,
                                max_length=32, max_prompt_length=16)
    data.setup("fit")
    return module, data


def _key(module, data) -> str:
    return reference_cache.cache_key(module, data, {s: data.datasets[s] for s in ("train", "val")},
                                     ("reference_logps",))[0]


def test_the_key_changes_with_the_data_the_reference_the_options_and_the_code(tiny_model_dir, pairs_file, tmp_path,
                                                                             monkeypatch):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    module, data = _module_and_data(str(model_dir), pairs_file)
    key = _key(module, data)
    assert _key(*_module_and_data(str(model_dir), pairs_file)) == key  # same inputs: same folder
    other_pairs = tmp_path / "pairs.jsonl"
    other_pairs.write_text("".join(Path(pairs_file).read_text().splitlines(keepends=True)[1:]))
    assert _key(module, _module_and_data(str(model_dir), str(other_pairs))[1]) != key  # the data
    assert _key(_module_and_data(str(model_dir), pairs_file, chunk_size=7)[0], data) != key  # an option
    assert _key(_module_and_data(str(model_dir), pairs_file, dtype="bfloat16")[0], data) != key
    weights = next(model_dir.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert _key(module, data) != key  # the reference's files
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns - 1))
    assert _key(module, data) == key
    monkeypatch.setattr(reference_cache, "_CODE_FILES", (*reference_cache._CODE_FILES, "losses.py"))
    assert _key(module, data) != key  # the code


def _trainer(data, rank: int = 0, world: int = 1) -> SimpleNamespace:
    """What ``prepare`` reads of a trainer: the data module, the rank, the world size, a barrier (a no-op here:
    the ranks are simulated one after the other in this process)."""
    return SimpleNamespace(datamodule=data, global_rank=rank, world_size=world,
                           strategy=SimpleNamespace(barrier=lambda *_: None))


def test_an_interrupted_build_computes_only_the_missing_pieces(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEPO_TOKENISED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(reference_cache, "PIECE_ROWS", 4)  # 16 + 16 pairs: 8 pieces of 4 pairs, 2 batches each
    module, data = _module_and_data(tiny_model_dir, pairs_file)
    compute, calls = reference_cache._reference_values, []

    def interrupted(*args):
        calls.append(len(args[3]))
        if len(calls) == 7:
            raise KeyboardInterrupt  # stopped inside the 4th piece: 3 pieces (12 pairs) are on disk
        return compute(*args)

    monkeypatch.setattr(reference_cache, "_reference_values", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reference_cache.prepare(module, _trainer(data), ("reference_logps",))
    monkeypatch.setattr(reference_cache, "_reference_values", compute)
    resumed = reference_cache.prepare(module, _trainer(data), ("reference_logps",))
    assert resumed.rows_computed == 32 - 12
    assert not list(resumed.folder.parent.glob(".*.building"))  # the pieces are gone once joined
    monkeypatch.setattr(reference_cache, "PIECE_ROWS", 256)
    whole = reference_cache.prepare(module, _trainer(data), ("reference_logps",))  # same key: read, not built
    assert whole.rows_computed == 0 and whole.folder == resumed.folder


def test_ranks_share_the_work_and_a_later_start_reads_without_computing(tiny_model_dir, pairs_file, tmp_path,
                                                                       monkeypatch):
    """Rank 1 of 2 computes pieces 1, 3, 5, 7 (of 8) and leaves the join to rank 0; a later one-rank start computes
    only the 4 pieces left and joins; the next reads. The values equal a one-rank build's. (Two ranks at once, each
    listing the missing pieces before either writes: tests/test_distributed.py, ``*_reference_cache`` modes.)"""
    monkeypatch.setattr(reference_cache, "PIECE_ROWS", 4)
    module, data = _module_and_data(tiny_model_dir, pairs_file)
    monkeypatch.setenv("SPARSEPO_TOKENISED_CACHE", str(tmp_path / "two"))
    splits = {s: data.datasets[s] for s in ("train", "val")}
    key, parts = reference_cache.cache_key(module, data, splits, ("reference_logps",))
    folder = tmp_path / "two" / "reference" / key
    assert reference_cache._build(module, _trainer(data, 1, 2), data, splits, folder, parts) == 16
    assert reference_cache._read_meta(folder) is None  # rank 1 does not join
    assert reference_cache._build(module, _trainer(data), data, splits, folder, parts) == 16
    two = reference_cache.prepare(module, _trainer(data, 1, 2), ("reference_logps",))
    assert two.rows_computed == 0 and two.folder == folder
    monkeypatch.setenv("SPARSEPO_TOKENISED_CACHE", str(tmp_path / "one"))
    one = reference_cache.prepare(module, _trainer(data), ("reference_logps",))
    assert one.rows_computed == 32
    for split in ("train", "val"):
        for got, want in zip(two._columns[split], one._columns[split], strict=True):
            assert np.array_equal(got, want)
