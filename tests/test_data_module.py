"""Data pipeline, ``PreferenceDataModule``: end to end batches, order and resumption, reports, options, hooks."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from sparsepo_lightning.data import (
    DataReport,
    PreferenceDataModule,
    PreferencePair,
    tokenize_pair,
)
from sparsepo_lightning.types import IGNORE_INDEX, PreferenceBatch
from tests.conftest import DATA_FIXTURES as FIXTURES
from tests.conftest import token_ids as _ids

# --------------------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------------------


def _datamodule(tokenizer, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(**{"max_length": 64, "max_prompt_length": 32, "batch_size": 2, **kwargs})
    dm.tokenizer = tokenizer
    return dm


def test_datamodule_end_to_end_gives_2b_by_t_batches(tiny_tokenizer):
    dm = _datamodule(
        tiny_tokenizer, train_file=str(FIXTURES / "pairs.jsonl"), val_file=str(FIXTURES / "chat.jsonl"),
        test_file=str(FIXTURES / "list.json"),
    )  # fmt: skip
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    for batch in batches:
        assert isinstance(batch, PreferenceBatch)
        assert batch.input_ids.shape[0] == 4 and batch.input_ids.shape == batch.labels.shape
        lengths = batch.attention_mask.sum(1)
        assert batch.input_ids.shape[1] == int(lengths.max())  # padded to the longest row, not max_length
    val = list(dm.val_dataloader())
    assert [b.input_ids.shape[0] for b in val] == [4, 2]
    assert dm.report["train"].rows_kept == 6 and dm.report["val"].rows_kept == 3
    dm.setup("test")
    assert [b.input_ids.shape[0] for b in dm.test_dataloader()] == [4]


def test_datamodule_fit_after_validate_still_loads_train(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, train_file=str(FIXTURES / "pairs.jsonl"), val_file=str(FIXTURES / "chat.jsonl"))
    dm.setup("validate")
    assert "train" not in dm.datasets and len(dm.datasets["val"]) == 3
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 6


def test_datamodule_train_order_depends_on_seed_and_pass_and_resumes_from_state(tiny_tokenizer):
    """A resumed run (fresh DataModule + saved state) must replay pass 2 of an uninterrupted run."""

    def datamodule(seed: int) -> PreferenceDataModule:
        dm = _datamodule(tiny_tokenizer, train_file=str(FIXTURES / "pairs.jsonl"), seed=seed, batch_size=6)
        dm.setup("fit")
        return dm

    def next_pass(loader) -> list[list[int]]:
        return next(iter(loader)).input_ids[:6, :4].tolist()

    uninterrupted = datamodule(1)
    loader = uninterrupted.train_dataloader()
    pass0 = next_pass(loader)
    state = uninterrupted.state_dict()
    pass1 = next_pass(loader)
    assert state == {"train_passes": 1, "train_batches_done": 0, "train_pass_complete": True} and pass0 != pass1
    resumed = datamodule(1)
    resumed.load_state_dict(state)
    assert next_pass(resumed.train_dataloader()) == pass1
    assert next_pass(datamodule(1).train_dataloader()) == pass0
    assert next_pass(datamodule(2).train_dataloader()) != pass0
    assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)  # so Lightning keeps it under DDP


@pytest.mark.parametrize("size", [7, 8])
def test_pass_sampler_deals_each_pass_to_the_ranks_as_distributed_sampler(size):
    """On W ranks pass k is PyTorch's ``DistributedSampler`` at epoch k with the same seed (padded by repeating
    the first indices when W does not divide the size, rank r takes every W-th from r): one process gets the whole
    permutation; ``skip`` leaves out the first indices of this rank's share and keeps the length of a full pass."""
    from torch.utils.data import DistributedSampler

    from sparsepo_lightning.data.sampler import PassShuffleSampler

    data = list(range(size))
    for passes in (0, 3):
        for rank in (0, 1):
            sampler = PassShuffleSampler(data, seed=7, passes=passes)
            sampler.num_replicas, sampler.rank = 2, rank  # as on rank `rank` of 2
            reference = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=7)
            reference.set_epoch(passes)
            assert list(sampler) == list(reference) and len(sampler) == len(reference) == 4
            resumed = PassShuffleSampler(data, seed=7, passes=passes, skip=3)
            resumed.num_replicas, resumed.rank = 2, rank
            assert list(resumed) == list(reference)[3:] and len(resumed) == 4
        alone = PassShuffleSampler(data, seed=7, passes=passes)
        assert list(alone) == torch.randperm(size, generator=torch.Generator().manual_seed(7 + passes)).tolist()


def test_datamodule_val_fraction_holds_out_seeded_pairs(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, train_file=str(FIXTURES / "pairs.jsonl"), val_fraction=0.34)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 4 and len(dm.datasets["val"]) == 2
    other = _datamodule(tiny_tokenizer, train_file=str(FIXTURES / "pairs.jsonl"), val_fraction=0.34)
    other.setup("fit")
    assert other.datasets["val"] == dm.datasets["val"]
    assert "hold-out" in dm.report["val"].source


def test_datamodule_without_validation_source_returns_no_val_batches(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, train_file=str(FIXTURES / "pairs.jsonl"), max_train_samples=3)
    dm.setup("fit")
    assert dm.val_dataloader() == [] and len(dm.datasets["train"]) == 3


def test_datamodule_counts_bad_rows_and_warns_once(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, train_file=str(FIXTURES / "bad_rows.jsonl"))
    with pytest.warns(UserWarning, match="skipped 8 bad rows") as record:
        dm.setup("fit")
    assert len([w for w in record if "bad rows" in str(w.message)]) == 1
    assert isinstance(dm.report["train"], DataReport) and dm.report["train"].rows_kept == 2
    strict = _datamodule(tiny_tokenizer, train_file=str(FIXTURES / "bad_rows.jsonl"), strict=True)
    with pytest.raises(ValueError, match=r"bad_rows\.jsonl:2"):
        strict.setup("fit")


def test_datamodule_reports_truncation(tiny_tokenizer):
    dm = _datamodule(tiny_tokenizer, train_file=str(FIXTURES / "pairs.jsonl"), max_length=8, max_prompt_length=4)
    dm.setup("fit")
    report = dm.report["train"]
    assert report.prompts_truncated >= 1 and report.responses_truncated >= 1
    assert "truncated (kept)" in report.summary()
    assert all(len(f["chosen_input_ids"]) <= 8 for f in dm.datasets["train"])


def test_datamodule_counts_responses_without_tokens(no_eos_tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "a"}\n{"prompt": "a", "chosen": "\\u200b", "rejected": "b"}\n'
    )
    dm = _datamodule(no_eos_tokenizer, train_file=str(path))
    with pytest.warns(UserWarning, match="skipped 1 bad row"):
        dm.setup("fit")
    assert dm.report["train"].counts == {"empty_response": 1}
    assert dm.report["train"].first["empty_response"].location == f"{path}:2"


def test_datamodule_loads_tokenizer_from_local_path_and_pads_with_eos(gpt2_style_tokenizer, tmp_path):
    gpt2_style_tokenizer.save_pretrained(tmp_path / "tok")
    dm = PreferenceDataModule(tokenizer=str(tmp_path / "tok"), train_file=str(FIXTURES / "pairs.jsonl"),
                              max_length=64, max_prompt_length=32, batch_size=6)  # fmt: skip
    with pytest.warns(UserWarning, match="no pad token") as record:
        dm.setup("fit")
        dm.setup("fit")
    assert len([w for w in record if "no pad token" in str(w.message)]) == 1
    batch = next(iter(dm.train_dataloader()))
    eos = gpt2_style_tokenizer.eos_token_id
    assert dm.pad_token_id == eos
    assert (batch.input_ids[batch.attention_mask == 0] == eos).all()
    assert (batch.labels[batch.attention_mask == 0] == IGNORE_INDEX).all()


def test_datamodule_option_errors_name_the_fix(tiny_tokenizer):
    with pytest.raises(ValueError, match="val_fraction: 0"):
        PreferenceDataModule(train_file="a.jsonl", val_file="b.jsonl", val_fraction=0.1)
    with pytest.raises(ValueError, match="val_split: null"):
        PreferenceDataModule(hub_dataset="org/x", val_fraction=0.1)
    with pytest.raises(ValueError, match="either train_file or hub_dataset"):
        PreferenceDataModule(train_file="a.jsonl", hub_dataset="org/x")
    with pytest.raises(ValueError, match="max_prompt_length"):
        PreferenceDataModule(max_length=8, max_prompt_length=8)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PreferenceDataModule(train_file="a.jsonl").setup("fit")
    with pytest.raises(ValueError, match="needs data.train_file"):
        _datamodule(tiny_tokenizer).setup("fit")


def test_datamodule_hub_source_reads_train_and_val_splits(tiny_tokenizer, monkeypatch):
    import datasets

    splits = {
        "train": [{"prompt": "hello", "chosen": " world", "rejected": " there"}] * 3,
        "test": [{"prompt": "The movie was", "chosen": " great.", "rejected": " bad."}],
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: datasets.Dataset.from_list(splits[split]))
    dm = _datamodule(copy.deepcopy(tiny_tokenizer), hub_dataset="org/prefs")
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 3 and len(dm.datasets["val"]) == 1
    assert dm.report["val"].source == "org/prefs[test]"


def test_add_bos_option_forces_or_suppresses_the_bos(tiny_tokenizer, gpt2_style_tokenizer):
    pair = PreferencePair("The movie was", " great.", " bad.", source="x")
    bos = tiny_tokenizer.bos_token_id
    assert tokenize_pair(pair, tiny_tokenizer)["chosen_input_ids"][0] == bos
    off = tokenize_pair(pair, tiny_tokenizer, add_bos=False)
    assert off["chosen_input_ids"] == _ids(tiny_tokenizer, "The movie was great.") + [tiny_tokenizer.eos_token_id]
    on = tokenize_pair(pair, gpt2_style_tokenizer, add_bos=True)["chosen_input_ids"]
    assert on[0] == gpt2_style_tokenizer.bos_token_id and on.count(gpt2_style_tokenizer.bos_token_id) == 2  # bos, eos


class _UpperCaseRows(PreferenceDataModule):
    """A task loader through the ``convert_rows`` hook: schema ``{q, good, bad}``; rows with ``bad == None``
    are refused with a task-specific reason."""

    def convert_rows(self, rows, split):
        from sparsepo_lightning.data.rows import RawRow, Rejection

        for row in rows:
            value = row.value
            if value.get("bad") is None:
                yield RawRow(row.location, rejection=Rejection("no_rejected", "bad", "no rejected answer", "drop it"))
                continue
            yield RawRow(row.location, {"prompt": value["q"], "chosen": value["good"], "rejected": value["bad"]})


def test_convert_rows_hook_runs_on_files_and_counts_task_rejections(tiny_tokenizer, tmp_path):
    path = tmp_path / "own.jsonl"
    rows = [{"q": "hello", "good": " world", "bad": " there"}, {"q": "hello", "good": " x", "bad": None}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = _UpperCaseRows(max_length=64, max_prompt_length=32, batch_size=2, train_file=str(path))
    dm.tokenizer = tiny_tokenizer
    dm.setup("fit")
    report = dm.report["train"]
    assert report.rows_read == 2 and report.counts == {"no_rejected": 1}
    assert f"{path}:2 field 'bad': no rejected answer. Fix: drop it." in report.summary()
    strict = _UpperCaseRows(max_length=64, max_prompt_length=32, train_file=str(path), strict=True)
    strict.tokenizer = tiny_tokenizer
    with pytest.raises(ValueError, match=r"own.jsonl:2 field 'bad'"):
        strict.setup("fit")


def test_hub_dataset_may_be_a_local_folder_in_hub_layout(tiny_tokenizer, tmp_path):
    root = tmp_path / "org-prefs"
    (root / "subset-a").mkdir(parents=True)
    (root / "subset-b").mkdir()
    row = {"prompt": "hello", "chosen": " world", "rejected": " there"}
    for subset, n in (("subset-a", 2), ("subset-b", 3)):
        (root / subset / "train.jsonl").write_text((json.dumps(row) + "\n") * n)
        (root / subset / "test.jsonl").write_text(json.dumps(row) + "\n")
    dm = _datamodule(tiny_tokenizer, hub_dataset=str(root), hub_kwargs={"data_dir": "subset-b"})
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 3 and len(dm.datasets["val"]) == 1
    assert dm.report["train"].source == f"{root}[train]"


def test_builtin_zephyr_chat_template_for_tokenizers_without_one(gpt2_style_tokenizer, tmp_path):
    """docs/method.md §6.1: ``<|system|>\\n{content}<eos><|user|>\\n...<eos><|assistant|>\\n{response}<eos>``."""
    path = tmp_path / "chat.jsonl"
    row = {"prompt": [{"role": "system", "content": ""}, {"role": "user", "content": "hello"}],
           "chosen": [{"role": "assistant", "content": "hello there"}], "rejected": "hello world"}
    path.write_text(json.dumps(row) + "\n")
    tokenizer = copy.deepcopy(gpt2_style_tokenizer)
    dm = _datamodule(tokenizer, train_file=str(path), chat_template="zephyr")
    dm.setup("fit")
    eos = tokenizer.eos_token
    rendered = tokenizer.decode(dm.datasets["train"][0]["chosen_input_ids"])
    assert rendered == f"<|system|>\n{eos}<|user|>\nhello{eos}<|assistant|>\nhello there{eos}"
    labels = dm.datasets["train"][0]["rejected_labels"]
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == f"hello world{eos}"
    with pytest.raises(ValueError, match="neither a built-in name"):
        PreferenceDataModule(chat_template="chatml")
