"""``PreferenceDataModule``: read + validate + tokenise preference pairs, and serve padded (2B, T) batches.

Typical YAML (``data:`` section of a LightningCLI config)::

    data:
      class_path: sparsepo_lightning.data.PreferenceDataModule
      init_args:
        train_file: data/quickstart/train.jsonl
        val_file: data/quickstart/val.jsonl
        max_length: 512
        max_prompt_length: 256
        batch_size: 4          # pairs per device per step; each batch has 2 * batch_size rows

``tokenizer`` is a model name or path (the CLI links it from the model). To use an already built tokenizer
(tests, notebooks), assign it before ``setup``: ``dm.tokenizer = my_tokenizer``; ``setup`` only loads one
when ``dm.tokenizer`` is still ``None``.

The tokenised splits are cached (``cache_tokenised``, ``token_cache.py``): ``prepare_data`` (rank 0) builds them
once, ``setup`` on every rank reads them; a later start with the same data, options, tokenizer and code reads them
back in about a second.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Sampler

from sparsepo_lightning.chat_templates import CHAT_TEMPLATES
from sparsepo_lightning.data.batching import (
    BatchOrderSampler,
    Layout,
    budget_loader_parts,
    layout_collate,
    log_budget_batches,
)
from sparsepo_lightning.data.collate import WithRowIds, collate_pairs
from sparsepo_lightning.data.datamodule_options import adopt_prompt_variants, check_options
from sparsepo_lightning.data.readers import iter_file, iter_hub, load_hub_split
from sparsepo_lightning.data.rows import DataReport, FieldNames, PreferencePair, RawRow
from sparsepo_lightning.data.sampler import PassShuffleSampler
from sparsepo_lightning.data.splits import hold_out, log_report, tokenizer_pad_id
from sparsepo_lightning.data.token_cache import cached_setup, checked_before, remember_checked
from sparsepo_lightning.data.tokenize import tokenize_pair
from sparsepo_lightning.data.tokenize_split import tokenize_items
from sparsepo_lightning.data.validate import validate_rows
from sparsepo_lightning.errors import ConfigError, DataError, MissingFileError
from sparsepo_lightning.model_sources import load_tokenizer

Features = dict[str, list[int]]


class PreferenceDataModule(LightningDataModule):
    """Preference pairs from local files (``.jsonl``/``.json``/``.parquet``) or a hub dataset.

    Sources per split: train from ``train_file`` or ``hub_dataset[train_split]``; validation from
    ``val_file``, else ``hub_dataset[val_split]``, else a seeded ``val_fraction`` of train; test from
    ``test_file``. Bad rows are skipped and counted (``self.report[split]``), or raise with ``strict=True``.

    Args:
        tokenizer: model name or path whose tokenizer is loaded in ``setup`` (unless ``self.tokenizer`` is set).
        train_file: local training file.
        val_file: local validation file.
        test_file: local test file.
        hub_dataset: ``datasets.load_dataset`` name used for train (and validation, see ``val_split``).
        hub_config: the hub dataset's configuration name.
        hub_kwargs: more ``datasets.load_dataset`` arguments, e.g. ``{data_dir: harmless-base}`` or
            ``{revision: <commit>}``. ``hub_dataset`` may also be a local folder in the hub's layout.
        train_split: hub split used for training.
        val_split: hub split used for validation; ``None`` for none (or to hold out ``val_fraction``).
        val_fraction: fraction of the training pairs held out for validation (seeded) when there is no
            other validation source; 0 disables.
        prompt_field: row field holding the prompt (may be absent in implicit-prompt conversations).
        chosen_field: row field holding the preferred response.
        rejected_field: row field holding the dispreferred response.
        chosen_spans_field: optional row field of per-token weights of the chosen response as character spans
            ``[[start, end, weight], ...]`` (see ``load_pairs``); batches then carry ``token_weights``.
        rejected_spans_field: the same for the rejected response.
        use_chat_template: render plain-text pairs with the tokenizer's chat template (chat-message rows
            always use it).
        chat_template: replaces the tokenizer's chat template: a built-in name (``zephyr``, the format of the
            released code, docs/method.md §6.1) or a Jinja template string. Needed for models that ship none.
        add_bos: start every row with the tokenizer's BOS token; ``None`` follows the tokenizer (BOS when it
            adds one itself), ``False`` never adds one (raw-text code models, docs/method.md §6.5).
        max_length: maximum tokens of prompt + response per row.
        max_prompt_length: prompt length kept (from the left) when a row would exceed ``max_length``.
        batch_size: preference pairs per batch *per device*; a batch holds ``2 * batch_size`` rows.
        layout: ``padded`` (each pair as two rows padded to the batch's longest) or ``packed`` (each pair as one
            segment ``[prompt | chosen | rejected]`` with a block mask: the prompt runs once and rows carry no
            padding; exact, see ``sparsepo_lightning/packing.py`` and docs/packing.md).
            ``auto`` chooses per micro-batch between padded and packed rows of a bound, by an estimate of the
            attention and MLP work of each (``layout_cost.py``): packing only where it saves work.
        pack_length: with ``packed``: most tokens per packed row (pairs placed first-fit); None puts all pairs of a
            micro-batch in one row. With ``auto``: a cap on the row bounds it tries.
        max_tokens: micro-batches by token budget instead of ``batch_size``: pairs are grouped (once, seeded) so
            that the positions the models run on stay within ``max_tokens`` in the chosen layout (``batching.py``).
        num_workers: DataLoader worker processes.
        seed: seeds the ``val_fraction`` hold-out and the train shuffle (pass k over the data is shuffled with
            ``seed + k``; the pass count is saved in checkpoints, so resuming replays the same order).
        strict: raise on the first bad row instead of skipping and counting it.
        max_train_samples: keep only the first N training pairs (after validation and hold-out).
        num_proc: worker processes that tokenise (``datasets.Dataset.map``); ``None`` tokenises in this process.
        prompt_variants: extra renderings of each row's prompt, ``{name: template}`` with one ``{prompt}`` placeholder
            (``prompt_variants.py``); batches then carry ``[variant prompt | response]`` rows per variant. Under a
            trainer, ``setup`` adds the variants the method declares (T-REG's contrastive prompts), so this is rarely
            set by hand. Both layouts (packed: each variant packed on its own).
        cache_tokenised: keep the tokenised splits with their data reports as Arrow files under
            ``<cache dir>/tokenised/<key>/`` (``token_cache.py``: the key covers the data, the options but the
            batching ones, the tokenizer and the code), so the next start reads them instead of tokenising again.
    """

    validate_fn = staticmethod(validate_rows)
    """How rows become items: ``(rows, self.fields, *, source, strict) -> (items, report)``. With ``tokenize_fn``
    and ``collate_fn``, what a subclass for another kind of row replaces (``data.UnpairedDataModule``)."""
    tokenize_fn = staticmethod(tokenize_pair)
    """``(item, tokenizer, max_length, max_prompt_length, use_chat_template, add_bos=...) -> features``."""
    collate_fn = staticmethod(collate_pairs)
    """``(features, pad_token_id) -> PreferenceBatch``."""
    item_name = "preference pair"
    """What one valid row is, in error messages."""

    def __init__(
        self,
        tokenizer: str | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        hub_dataset: str | None = None,
        hub_config: str | None = None,
        hub_kwargs: dict[str, Any] | None = None,
        train_split: str = "train",
        val_split: str | None = "test",
        val_fraction: float = 0.0,
        prompt_field: str = "prompt",
        chosen_field: str = "chosen",
        rejected_field: str = "rejected",
        chosen_spans_field: str = "chosen_spans",
        rejected_spans_field: str = "rejected_spans",
        use_chat_template: bool = False,
        chat_template: str | None = None,
        add_bos: bool | None = None,
        max_length: int = 512,
        max_prompt_length: int = 256,
        batch_size: int = 4,
        layout: Layout = "padded",
        pack_length: int | None = None,
        max_tokens: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        strict: bool = False,
        max_train_samples: int | None = None,
        num_proc: int | None = None,
        cache_tokenised: bool = True,
        prompt_variants: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.train_file, self.val_file, self.test_file = train_file, val_file, test_file
        self.hub_dataset, self.hub_config, self.hub_kwargs = hub_dataset, hub_config, dict(hub_kwargs or {})
        self.train_split, self.val_split, self.val_fraction = train_split, val_split, val_fraction
        self.fields = FieldNames(prompt_field, chosen_field, rejected_field, chosen_spans_field, rejected_spans_field)
        self.use_chat_template, self.add_bos = use_chat_template, add_bos
        self.chat_template = CHAT_TEMPLATES.get(chat_template, chat_template) if chat_template else None
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.layout, self.pack_length, self.max_tokens = layout, pack_length, max_tokens
        self.strict, self.max_train_samples = strict, max_train_samples
        self.num_proc, self.cache_tokenised = num_proc, cache_tokenised
        self.prompt_variants = dict(prompt_variants) if prompt_variants else None
        check_options(self)
        self.tokenizer: Any = None
        """The tokenizer object; loaded from ``tokenizer`` in ``setup`` unless assigned beforehand."""
        self.pad_token_id: int | None = None
        self.report: dict[str, DataReport] = {}
        self._checked: dict[tuple[str, str], list[PreferencePair]] = {}
        """Per split (``train``/``val``/``test``): rows read, rejected per reason, truncated."""
        self.datasets: dict[str, Sequence[Features]] = {}
        """Per split, the tokenised features: a list, or a ``CachedFeatures`` (the same dicts, memory-mapped)."""
        self._train_passes = 0
        self._train_skip = 0
        self._train_sampler: PassShuffleSampler | BatchOrderSampler | None = None
        self.sources: dict[str, list[str]] = {}
        """Per split, the row location (``file:line``) of each kept pair, parallel to ``datasets[split]``."""

    def check_sources(self, stage: str) -> None:
        """Before any model loads: each local file ``stage`` reads exists (else ``MissingFileError``) and holds a
        valid pair (else ``DataError``), both naming the option. The pairs are kept for :meth:`setup`. A file that
        passed before (same bytes, options and code: ``token_cache.checked_before``) is not read again."""
        for split in {"fit": ("train", "val"), "validate": ("val", "train"), "test": ("test",)}.get(stage, ()):
            path, option = getattr(self, f"{split}_file", None), f"data.{split}_file"
            if path is None or (split == "train" and stage == "validate" and not self.val_fraction > 0):
                continue
            if not Path(path).is_file():
                raise MissingFileError(f"{option}: data file {str(path)!r} does not exist (working directory "
                                       f"{os.getcwd()}). Fix: correct {option} in the config or pass --{option}.")
            if checked_before(self, split, path):
                continue
            if not (pairs := self._read(path, None, split)):
                raise DataError(f"{option}: no valid {self.item_name} in {path}.\n{self.report[split].summary()}\n"
                                "Fix: repair the rows listed above, or point the option at another file.")
            self._checked[(split, str(path))] = pairs
            remember_checked(self, split, path)

    # -- Lightning hooks ---------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Once (rank 0), before ``setup`` on every rank: download hub splits; under a trainer with ``cache_tokenised``,
        also tokenise the splits the trainer's stage needs into the cache that ``setup`` on every rank reads."""
        for split in filter(None, (self.train_split, self.val_split) if self.hub_dataset else ()):
            load_hub_split(self.hub_dataset, self.hub_config, split, **self.hub_kwargs)
        if self.cache_tokenised and self.trainer is not None:
            self.setup(self.trainer.state.fn.value)

    def setup(self, stage: str | None = None) -> None:
        """Load, validate and tokenise the splits ``stage`` needs (all available ones for ``None``), or read them
        from the tokenised cache."""
        adopt_prompt_variants(self)
        self._ensure_tokenizer()
        needs_train = stage in ("fit", None) and "train" not in self.datasets
        needs_val = stage in ("fit", "validate", None) and "val" not in self.datasets
        if needs_train or needs_val:
            self._setup_train_val(stage)
        if stage in ("test", None) and self.test_file and "test" not in self.datasets:
            cached_setup(self, ("test",), lambda: self._add_split("test", self._read(self.test_file, None, "test")))
        if stage == "test" and "test" not in self.datasets:
            raise ConfigError("data: testing needs data.test_file.")

    def train_dataloader(self) -> DataLoader:
        """Shuffled by a ``PassShuffleSampler``: the order of the k-th pass depends only on ``seed + k`` (and, under
        DDP/FSDP, the rank's share of it on the rank)."""
        if self.max_tokens is not None:
            return self._budget_loader("train", shuffle=True)
        self._train_sampler = PassShuffleSampler(self._split("train"), self.seed, passes=self._train_passes,
                                                 skip=self._train_skip * self.batch_size)
        self._train_skip = 0
        return self._loader("train", sampler=self._train_sampler)

    def state_dict(self) -> dict[str, int | bool]:
        """Saved in checkpoints: passes over the training data started, and batches done in the current pass.

        The batch count is Lightning's (``batch_progress.current.processed``), not the sampler's, because the
        trainer prefetches a batch ahead. Resuming mid-pass replays that pass's order minus the batches done.
        """
        sampler = self._train_sampler
        passes = sampler.passes if sampler is not None else self._train_passes
        trainer = self.trainer
        done, complete = 0, True
        if sampler is not None and trainer is not None:
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            complete = done >= trainer.num_training_batches
        return {"train_passes": passes, "train_batches_done": done, "train_pass_complete": complete}

    def load_state_dict(self, state_dict: dict[str, int | bool]) -> None:
        passes = int(state_dict.get("train_passes", 0))
        if passes > 0 and not state_dict.get("train_pass_complete", True):  # resume inside pass `passes - 1`
            self._train_passes, self._train_skip = passes - 1, int(state_dict["train_batches_done"])
        else:
            self._train_passes, self._train_skip = passes, 0

    def train_batch_sources(self, batch_idx: int) -> list[str] | None:
        """Row locations (``file:line``) of training batch ``batch_idx`` of the current pass (single process only;
        ``None`` when unknown, e.g. under DDP/FSDP, where each rank trains on other rows)."""
        sampler = self._train_sampler
        if sampler is None or not sampler.order or (self.trainer is not None and self.trainer.world_size > 1):
            return None
        if not isinstance(sampler, PassShuffleSampler):  # micro-batches by token budget
            indices = sampler.dataset.batches[sampler.order[batch_idx]] if batch_idx < len(sampler.order) else []
        else:
            indices = sampler.order[batch_idx * self.batch_size : (batch_idx + 1) * self.batch_size]
        sources = self.sources.get("train", [])
        return [sources[i] for i in indices if i < len(sources)] or None

    def val_dataloader(self) -> DataLoader | list:
        """In file order; an empty list (no validation) when there is no validation source."""
        return self._loader("val") if self._split("val") else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    # -- internals -----------------------------------------------------------------------------------------

    def _ensure_tokenizer(self) -> None:
        if self.tokenizer is None:
            if self.tokenizer_name is None:
                raise ConfigError(
                    "PreferenceDataModule needs a tokenizer: set data.tokenizer (the CLI links it from the model "
                    "name) or assign dm.tokenizer = <tokenizer object> before setup()."
                )
            self.tokenizer = load_tokenizer(self.tokenizer_name)
        if self.chat_template is not None:
            self.tokenizer.chat_template = self.chat_template
        if self.pad_token_id is None:
            self.pad_token_id = tokenizer_pad_id(self.tokenizer)

    def _setup_train_val(self, stage: str | None) -> None:
        has_train = bool(self.train_file or self.hub_dataset)
        if stage == "fit" and not has_train:
            raise ConfigError("data: fitting needs data.train_file or data.hub_dataset.")
        read_train = has_train and (stage != "validate" or self.val_fraction > 0)
        cached_setup(self, ("train", "val") if read_train else ("val",), lambda: self._build_train_val(read_train))

    def _build_train_val(self, read_train: bool) -> None:
        train = self._read(self.train_file, self.train_split, "train") if read_train else None
        train, val = self._validation_pairs(train)
        if train is not None:
            self._add_split("train", train[: self.max_train_samples])
        if val:
            self._add_split("val", val)
        else:
            self.datasets["val"] = []

    def _validation_pairs(
        self, train: list[PreferencePair] | None
    ) -> tuple[list[PreferencePair] | None, list[PreferencePair]]:
        """``(train, val)``: val from val_file, the hub val_split, or a seeded hold-out of train (in that order)."""
        if self.val_file:
            return train, self._read(self.val_file, None, "val")
        if self.hub_dataset and self.val_split:
            return train, self._read(None, self.val_split, "val")
        if self.val_fraction > 0 and train is not None:
            train, val = hold_out(train, self.val_fraction, self.seed)
            source = f"{self.report['train'].source} (val_fraction={self.val_fraction} hold-out)"
            self.report["val"] = DataReport(source=source, rows_read=len(val))
            return train, val
        return train, []

    def _read(self, path: str | None, hub_split: str | None, split: str) -> list[PreferencePair]:
        """Validated pairs of one source; the report is stored under ``split``."""
        if path is not None and (split, str(path)) in self._checked:  # validated by check_sources
            return self._checked.pop((split, str(path)))
        if path is not None:
            rows, name = iter_file(path), path
        elif self.hub_dataset is not None:
            rows = iter_hub(self.hub_dataset, self.hub_config, hub_split, **self.hub_kwargs)
            name = f"{self.hub_dataset}[{hub_split}]"
        else:
            raise ConfigError(f"data: no source for the {split} split. Set {split}_file or hub_dataset.")
        rows = self.convert_rows(rows, split)
        pairs, self.report[split] = self.validate_fn(rows, self.fields, source=name, strict=self.strict)
        return pairs

    def convert_rows(self, rows: Iterable[RawRow], split: str) -> Iterable[RawRow]:
        """Task hook: map rows of a dataset's own schema to ``{prompt, chosen, rejected}`` rows.

        Called on every source (local file or hub split) before validation, so a task loader is tested on
        fixture files through exactly the code that reads the hub. Keep each output row's ``location`` (or
        derive it, e.g. ``file:12/pair 2``) and return ``RawRow(location, rejection=Rejection(...))`` for rows
        that cannot be converted: they are counted per reason in the report (or raise with ``strict``).
        The default passes rows through unchanged.

        Args:
            rows: decoded rows of one source.
            split: ``train``, ``val`` or ``test``.
        """
        return rows

    def _add_split(self, split: str, pairs: list[PreferencePair]) -> None:
        """Tokenise pairs into features (in ``num_proc`` processes), count truncations / empty responses /
        unplaceable spans, log the report."""
        report = self.report[split]
        features, sources = tokenize_items(self, pairs, report)
        if not features:
            raise DataError(f"data: no valid {self.item_name} left for the {split} split.\n{report.summary()}")
        self.datasets[split] = features
        self.sources[split] = sources
        log_report(split, report)

    def _split(self, split: str) -> list[Features]:
        if split not in self.datasets:
            raise RuntimeError(f"PreferenceDataModule: the {split} split is not set up; call setup() first.")
        return self.datasets[split]

    def _loader(self, split: str, sampler: Sampler | None = None) -> DataLoader:
        if self.max_tokens is not None and split != "train":
            return self._budget_loader(split, shuffle=False)
        collate = layout_collate(self.layout, self.collate_fn, self.pad_token_id, self.pack_length,
                                 self.tokenizer_name)
        return DataLoader(WithRowIds(self._split(split)), batch_size=self.batch_size, sampler=sampler,
                          collate_fn=collate, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def _budget_loader(self, split: str, shuffle: bool) -> DataLoader:
        """Micro-batches by token budget (``batching.py``), their order per pass and rank by ``BatchOrderSampler``."""
        collate = layout_collate(self.layout, self.collate_fn, self.pad_token_id, self.pack_length,
                                 self.tokenizer_name)
        batches = budget_loader_parts(WithRowIds(self._split(split)), self.max_tokens, self.layout, self.pack_length,
                                      collate, self.seed if shuffle else None)
        log_budget_batches(split, self.layout, self.max_tokens, self.pack_length, batches)
        sampler = BatchOrderSampler(batches, self.seed, shuffle, *((self._train_passes, self._train_skip) if shuffle
                                                                    else (0, 0)))
        if shuffle:
            self._train_sampler, self._train_skip = sampler, 0
        return DataLoader(batches, batch_size=None, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

