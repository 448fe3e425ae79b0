"""``UnpairedDataModule``: unpaired examples ``{"prompt", "completion", "label"}`` for BCO, as (N, T) batches.

TRL's unpaired preference format: each row is one prompt with one completion and a boolean label, ``true`` for a
desirable completion and ``false`` for an undesirable one; nothing pairs the rows. Typical YAML, with the BCO
objective (``configs/methods/bco.yaml``)::

    data:
      class_path: sparsepo_lightning.data.UnpairedDataModule
      init_args:
        train_file: data/feedback/train.jsonl      # {"prompt": ..., "completion": ..., "label": true}
        val_file: data/feedback/val.jsonl
        batch_size: 8                              # examples (= rows) per device per step

Everything else is :class:`PreferenceDataModule`'s: sources (files, hub datasets, ``val_fraction``), validation
with a report of every bad row (``missing_field``, ``wrong_type`` for a label that is not a boolean,
``empty_response``, ``bad_json``: ``self.report[split]``, or an error with ``strict``), tokenisation (a completion is
tokenised like one response of a pair), the checkpointed shuffle. A batch of N examples is a ``PreferenceBatch`` of
N rows with ``desirable`` set (N labels), which only the BCO objective trains on. Paired files train BCO too, with
``PreferenceDataModule`` (chosen = desirable, rejected = undesirable).
"""

from __future__ import annotations

import inspect
from typing import Any

from sparsepo_lightning.data.collate import collate_examples
from sparsepo_lightning.data.datamodule import PreferenceDataModule
from sparsepo_lightning.data.rows import UnpairedFieldNames
from sparsepo_lightning.data.tokenize import tokenize_example
from sparsepo_lightning.data.validate import validate_examples
from sparsepo_lightning.errors import ConfigError

_PAIR_OPTIONS = ("chosen_field", "rejected_field", "chosen_spans_field", "rejected_spans_field")


class UnpairedDataModule(PreferenceDataModule):
    """Unpaired examples from local files (``.jsonl``/``.json``/``.parquet``) or a hub dataset (module docstring).

    Args:
        completion_field: row field holding the completion (text or chat messages).
        label_field: row field holding the label, a boolean: true = desirable, false = undesirable.
        **kwargs: every other :class:`PreferenceDataModule` option (``train_file``, ``val_file``, ``hub_dataset``,
            ``prompt_field``, ``max_length``, ``batch_size``, ``strict``...) except the pair columns
            (``chosen_field``, ``rejected_field``, span columns): ``batch_size`` counts examples, so a batch holds
            ``batch_size`` rows (a paired batch holds ``2 * batch_size``). Unpaired rows carry no span weights.
    """

    validate_fn = staticmethod(validate_examples)
    tokenize_fn = staticmethod(tokenize_example)
    collate_fn = staticmethod(collate_examples)
    item_name = "unpaired example"

    def __init__(self, completion_field: str = "completion", label_field: str = "label", **kwargs: Any) -> None:
        defaults = inspect.signature(PreferenceDataModule.__init__).parameters
        given = [option for option in _PAIR_OPTIONS if kwargs.get(option, defaults[option].default)
                 != defaults[option].default]  # the CLI passes every default of the base class
        if given:
            raise ConfigError(
                f"data.{given[0]}: UnpairedDataModule reads unpaired rows (prompt, completion, label), which have no "
                "chosen/rejected columns. Fix: set data.completion_field and data.label_field instead, or use "
                "PreferenceDataModule for paired rows.")
        super().__init__(**kwargs)
        self.fields = UnpairedFieldNames(self.fields.prompt, completion_field, label_field)
