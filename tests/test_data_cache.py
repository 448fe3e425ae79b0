"""Data pipeline, tokenise once: the tokenised-split cache (``token_cache``), its key, its storage
(``CachedFeatures``), worker processes (``num_proc``), concurrent builders and the ranks' hand-over."""

from __future__ import annotations

import copy
import functools
import json
import multiprocessing
import pickle
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import normalizers
from torch.utils.data import DataLoader

from sparsepo_lightning.data import (
    PreferenceDataModule,
    UnpairedDataModule,
    collate_pairs,
    token_cache,
    tokenize_pair,
)
from sparsepo_lightning.data.arrow_features import CachedFeatures
from sparsepo_lightning.data.token_cache import CACHE_ENV_VAR, cache_key, cache_root
from sparsepo_lightning.data.tokenize import EmptyResponseError
from sparsepo_lightning.model_sources import CACHE_ENV_VAR as SPARSEPO_CACHE


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """This test's own ``SPARSEPO_CACHE``; the tokenised cache in its default place, ``<cache_dir()>/tokenised``."""
    monkeypatch.setenv(SPARSEPO_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(CACHE_ENV_VAR, raising=False)
    return tmp_path / "cache" / "tokenised"


@pytest.fixture
def tokenize_calls(monkeypatch) -> list[int]:
    """Counts ``tokenize_fn`` calls of ``PreferenceDataModule`` (the wrapper keeps the function's name and file, so
    the cache key is the same as without it)."""
    calls = []

    @functools.wraps(tokenize_pair)
    def counting(*args, **kwargs):
        calls.append(1)
        return tokenize_pair(*args, **kwargs)

    monkeypatch.setattr(PreferenceDataModule, "tokenize_fn", staticmethod(counting))
    return calls


def _write(path: Path, rows: list[dict | str]) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _mixed_rows(n: int = 12) -> list[dict | str]:
    """Valid pairs (some with chosen spans, some long enough to be truncated) among rows rejected while reading
    (bad JSON, missing field) and while tokenising (responses without tokens: ``\\u200b`` and no EOS)."""
    rows: list[dict | str] = []
    for i in range(n):
        row = {"prompt": "a b " * (1 + i % 3), "chosen": " b" * (1 + i % 4), "rejected": " a" * (2 + i % 2)}
        if i % 3 == 0:
            row["chosen_spans"] = [[0, 2, 1.5]]
        rows.append(row)
    rows[3] = "{not json"
    rows[5] = {"prompt": "a", "chosen": "b"}
    rows[7] = {"prompt": "a", "chosen": "\u200b", "rejected": "b"}
    rows[10] = {"prompt": "b", "chosen": "a", "rejected": "\u200b"}
    return rows


def _dm(tokenizer, cls=PreferenceDataModule, **kwargs) -> PreferenceDataModule:
    dm = cls(**{"max_length": 10, "max_prompt_length": 6, "batch_size": 2, **kwargs})
    dm.tokenizer = tokenizer
    return dm


def _setup(dm: PreferenceDataModule, stage: str | None = "fit") -> list[str]:
    """``dm.setup(stage)``; the warnings it emitted (the reports of splits with rejected rows)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        dm.setup(stage)
    return [str(w.message) for w in record]


def _state(dm: PreferenceDataModule) -> dict:
    return {split: (list(dm.datasets[split]), dm.sources.get(split), dm.report.get(split)) for split in dm.datasets}


# --------------------------------------------------------------------------------------------------------
# Hits
# --------------------------------------------------------------------------------------------------------


def test_second_setup_reads_the_cache_with_the_same_features_sources_report_and_batches(
    no_eos_tokenizer, tmp_path, cache, tokenize_calls
):
    train = _write(tmp_path / "train.jsonl", _mixed_rows())
    test = _write(tmp_path / "test.jsonl", _mixed_rows(11))
    options = {"train_file": train, "test_file": test, "val_fraction": 0.25, "seed": 3}
    plain = _dm(no_eos_tokenizer, cache_tokenised=False, **options)
    plain_logs = _setup(plain, None)
    assert isinstance(plain.datasets["train"], list) and not cache.exists()
    uncached_calls = len(tokenize_calls)
    assert uncached_calls == (12 - 2) + (11 - 2)  # the pairs left after reading, train + val and test
    cold = _dm(no_eos_tokenizer, **options)
    assert _setup(cold, None) == plain_logs
    assert len(tokenize_calls) == 2 * uncached_calls
    assert sorted(p.name.split("-")[1] for p in cache.iterdir()) == ["test", "train+val"]
    warm = _dm(no_eos_tokenizer, **options)
    assert _setup(warm, None) == plain_logs  # the same reports, logged the same way
    assert len(tokenize_calls) == 2 * uncached_calls  # nothing tokenised: read from the cache
    for dm in (cold, warm):
        assert all(isinstance(dm.datasets[s], CachedFeatures) for s in ("train", "val", "test"))
        assert _state(dm) == _state(plain)
    report = warm.report["train"]
    assert report.counts == {"bad_json": 1, "missing_field": 1, "empty_response": 2}
    assert report.first["empty_response"].location == f"{train}:8" and "no token to train on" in report.summary()
    assert report.first["bad_json"] == plain.report["train"].first["bad_json"]
    assert warm.report["val"].source.endswith("(val_fraction=0.25 hold-out)")
    assert any("chosen_span_weights" in f for f in warm.datasets["train"])
    assert any("chosen_span_weights" not in f for f in warm.datasets["train"])  # absent keys stay absent
    for split in ("train", "val", "test"):
        loader = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}[split]
        for a, b in zip(getattr(warm, loader)(), getattr(plain, loader)(), strict=True):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
            assert (a.token_weights is None) == (b.token_weights is None)


def test_unpaired_examples_go_through_the_cache(tiny_tokenizer, tmp_path):
    rows = [{"prompt": "hello", "completion": " world", "label": i % 2 == 0} for i in range(5)]
    train = _write(tmp_path / "train.jsonl", [*rows, {"prompt": "x", "completion": "y", "label": "yes"}])
    plain = _dm(tiny_tokenizer, UnpairedDataModule, train_file=train, cache_tokenised=False)
    _setup(plain)
    cold, warm = (_dm(tiny_tokenizer, UnpairedDataModule, train_file=train) for _ in range(2))
    _setup(cold), _setup(warm)
    assert _state(warm) == _state(cold) == _state(plain)
    assert [f["desirable"] for f in warm.datasets["train"]] == [True, False, True, False, True]
    assert warm.report["train"].counts == {"wrong_type": 1} and warm.report["train"].items == "examples"


def test_cache_off_writes_nothing(tiny_tokenizer, pairs_file, tmp_path):
    dm = _dm(tiny_tokenizer, train_file=pairs_file, cache_tokenised=False)
    dm.check_sources("fit")
    _setup(dm)
    assert len(dm.datasets["train"]) == 16 and not (tmp_path / "cache").exists()


def test_check_sources_reads_a_file_once_per_content(tiny_tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "pairs.jsonl"
    _write(path, [{"prompt": "hello", "chosen": " world", "rejected": " there"}] * 3)
    reads = []
    monkeypatch.setattr(PreferenceDataModule, "_read", lambda self, *a: reads.append(a) or [1])
    for _ in range(2):
        _dm(tiny_tokenizer, train_file=str(path)).check_sources("fit")
    assert len(reads) == 1  # the second check knew this file
    _write(path, [{"prompt": "hello", "chosen": " world", "rejected": " there"}] * 4)
    _dm(tiny_tokenizer, train_file=str(path)).check_sources("fit")
    _dm(tiny_tokenizer, train_file=str(path), max_length=12).check_sources("fit")
    assert len(reads) == 3  # new content, then new options


def test_prepare_data_builds_on_rank_zero_and_the_other_ranks_only_read(tiny_tokenizer, pairs_file, tokenize_calls):
    rank0 = _dm(tiny_tokenizer, train_file=pairs_file, val_fraction=0.25)
    rank0.trainer = SimpleNamespace(state=SimpleNamespace(fn=SimpleNamespace(value="fit")))  # a trainer that fits
    rank0.prepare_data()
    assert set(rank0.datasets) == {"train", "val"} and len(tokenize_calls) == 16
    rank0.setup("fit")  # Lightning's setup after prepare_data: nothing left to do
    rank1 = _dm(tiny_tokenizer, train_file=pairs_file, val_fraction=0.25)
    rank1.setup("fit")
    assert len(tokenize_calls) == 16 and _state(rank1) == _state(rank0)


# --------------------------------------------------------------------------------------------------------
# The key
# --------------------------------------------------------------------------------------------------------


class _OtherModule(PreferenceDataModule):
    """Same rows and options, another class (a task module overriding ``convert_rows`` would be one)."""


def test_key_follows_data_options_tokenizer_template_class_and_code_but_not_batching(
    tiny_tokenizer, tmp_path, monkeypatch
):
    path = tmp_path / "pairs.jsonl"
    _write(path, [{"prompt": "hello", "chosen": " world", "rejected": " there"}])

    def key(tokenizer=tiny_tokenizer, cls=PreferenceDataModule, **kwargs) -> str:
        return cache_key(_dm(tokenizer, cls, train_file=str(path), **kwargs), ("train", "val"))[0]

    base = key()
    assert base == key() and base.startswith("PreferenceDataModule-train+val-")
    assert key(batch_size=7, num_workers=2, num_proc=2, seed=5) == base  # batching options (and seed without hold-out)
    templated = copy.deepcopy(tiny_tokenizer)
    templated.chat_template = "{{ messages[0]['content'] }}"
    grown = copy.deepcopy(tiny_tokenizer)
    grown.add_tokens(["<extra>"])
    changed = copy.deepcopy(tiny_tokenizer)
    changed.backend_tokenizer.normalizer = normalizers.Lowercase()  # same vocabulary, other serialisation
    mutated = _dm(tiny_tokenizer, train_file=str(path))
    mutated.max_length = 12  # changed after __init__
    others = [key(max_length=12), key(max_prompt_length=4), key(use_chat_template=True), key(add_bos=False),
              key(chat_template="zephyr"), key(strict=True), key(max_train_samples=3), key(val_fraction=0.5),
              key(val_fraction=0.5, seed=5), key(prompt_field="question"), key(templated), key(grown), key(changed),
              key(cls=_OtherModule)]
    assert base not in others and len(set(others)) == len(others)
    assert cache_key(mutated, ("train", "val"))[0] == key(max_length=12)  # what the module holds counts
    _write(path, [{"prompt": "hello", "chosen": " world", "rejected": " here"}])  # same size, other bytes
    assert key() != base
    edited = key()
    code = tmp_path / "code"
    shutil.copytree(Path(token_cache.__file__).parent, code)
    monkeypatch.setattr(token_cache, "_DATA_DIR", code)
    assert key() == edited  # the same sources in another folder
    (code / "tokenize.py").write_text((code / "tokenize.py").read_text() + "\n# edited\n")
    assert key() != edited


# --------------------------------------------------------------------------------------------------------
# Storage, workers, concurrent builders
# --------------------------------------------------------------------------------------------------------


def test_cached_features_behave_like_the_list_they_replace(tiny_tokenizer, pairs_file):
    plain = _dm(tiny_tokenizer, train_file=pairs_file, cache_tokenised=False)
    cached = _dm(tiny_tokenizer, train_file=pairs_file)
    _setup(plain), _setup(cached)
    rows, features = plain.datasets["train"], cached.datasets["train"]
    assert isinstance(features, CachedFeatures) and len(features) == len(rows) == 16
    assert features == rows and rows == features and features != rows[:-1] and features != []
    assert features[3] == rows[3] and features[-1] == rows[-1] and features[2:9:3] == rows[2:9:3]
    assert features.__getitems__([5, 0, 5]) == [rows[5], rows[0], rows[5]]
    with pytest.raises(IndexError):
        features[16]
    assert len(pickle.dumps(features)) < 10_000  # by file path, not by content
    assert pickle.loads(pickle.dumps(features)) == rows
    ints = rows[0]["chosen_input_ids"]
    assert features[0]["chosen_input_ids"] == ints and all(type(i) is int for i in features[0]["chosen_input_ids"])
    collate = functools.partial(collate_pairs, pad_token_id=tiny_tokenizer.pad_token_id)
    in_worker = DataLoader(features, batch_size=5, num_workers=1, collate_fn=collate)  # rows read in a worker process
    for a, b in zip(in_worker, DataLoader(rows, batch_size=5, collate_fn=collate), strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)


def test_num_proc_workers_give_the_same_features_report_and_strict_error(no_eos_tokenizer, tmp_path):
    train = _write(tmp_path / "train.jsonl", _mixed_rows(40))
    one = _dm(no_eos_tokenizer, train_file=train, cache_tokenised=False)
    two = _dm(no_eos_tokenizer, train_file=train, cache_tokenised=False, num_proc=2)
    assert _setup(one) == _setup(two)
    assert _state(two) == _state(one) and two.report["train"].counts["empty_response"] == 2
    errors = []
    for num_proc in (None, 2):
        with pytest.raises(EmptyResponseError) as error:
            _dm(no_eos_tokenizer, train_file=_write(tmp_path / "ok.jsonl", [r for i, r in enumerate(_mixed_rows(40))
                                                                             if i not in (3, 5)]),
                strict=True, num_proc=num_proc).setup("fit")
        errors.append(str(error.value))
    assert errors[0] == errors[1] and ".jsonl:6:" in errors[0]  # the first bad row, in file order


def _build_in_process(tokenizer, path: str, start, out) -> None:
    """One of two processes building the same key at the same moment."""
    dm = _dm(tokenizer, train_file=path)
    start.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup("fit")
    out.put((list(dm.datasets["train"]), dm.sources["train"], dm.report["train"]))


def test_two_processes_building_the_same_key_both_succeed(tiny_tokenizer, pairs_file, cache):
    context = multiprocessing.get_context("fork")
    start, out = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_build_in_process, args=(tiny_tokenizer, pairs_file, start, out))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=240) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0] and results[0] == results[1]
    assert [p.name.split("-")[1] for p in cache.iterdir()] == ["train+val"]  # one folder, no temporary one left
    dm = _dm(tiny_tokenizer, train_file=pairs_file)
    _setup(dm)
    assert (list(dm.datasets["train"]), dm.sources["train"], dm.report["train"]) == results[0]


def test_the_process_that_renames_second_reads_the_first_ones_cache(tiny_tokenizer, pairs_file, cache, monkeypatch):
    first = _dm(tiny_tokenizer, train_file=pairs_file)
    _setup(first)
    (folder,) = cache.iterdir()
    read_meta, looked = token_cache._read_meta, []

    def late(folder: Path):  # the second process looks before the first one's rename, so it builds too
        looked.append(folder)
        return None if len(looked) == 1 else read_meta(folder)

    monkeypatch.setattr(token_cache, "_read_meta", late)
    second = _dm(tiny_tokenizer, train_file=pairs_file)
    _setup(second)
    assert looked == [folder, folder] and _state(second) == _state(first)
    assert second.datasets["train"].dataset.cache_files[0]["filename"] == str(folder / "train.arrow")
    assert list(cache.iterdir()) == [folder]  # the second build was removed


def test_a_damaged_cache_is_built_again_and_replaced(tiny_tokenizer, pairs_file, cache):
    first = _dm(tiny_tokenizer, train_file=pairs_file)
    _setup(first)
    (folder,) = cache.iterdir()
    (folder / "train.arrow").unlink()
    again = _dm(tiny_tokenizer, train_file=pairs_file)
    _setup(again)
    assert _state(again) == _state(first) and (folder / "train.arrow").is_file() and list(cache.iterdir()) == [folder]
    (folder / "train.arrow").write_bytes(b"not arrow")
    with pytest.warns(UserWarning, match="unreadable"):
        third = _dm(tiny_tokenizer, train_file=pairs_file)
        third.setup("fit")
    assert _state(third) == _state(first) and list(cache.iterdir()) == [folder]


def test_a_module_whose_code_has_no_source_is_not_cached(tiny_tokenizer, pairs_file, tmp_path):
    namespace = {"PreferenceDataModule": PreferenceDataModule}
    exec("class Made(PreferenceDataModule):\n    def convert_rows(self, rows, split):\n        return rows\n",
         namespace)  # as the README example is run: no file, no source
    dm = _dm(tiny_tokenizer, namespace["Made"], train_file=pairs_file)
    assert cache_key(dm, ("train", "val")) is None
    dm.check_sources("fit")
    _setup(dm)
    assert len(dm.datasets["train"]) == 16 and not (tmp_path / "cache").exists()


def test_cache_root_is_under_cache_dir_unless_the_variable_names_one(tmp_path, monkeypatch):
    assert cache_root() == tmp_path / "cache" / "tokenised"
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"
