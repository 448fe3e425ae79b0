"""Which data inputs a composed configuration means, before jsonargparse merges the configs.

jsonargparse keeps the ``init_args`` of an earlier config when a later one changes ``data.class_path`` (if the new
class accepts them). For the inputs of a data module (files, hub dataset, splits, field names) that is wrong: a
recipe's ``val_file`` of ``{prompt, chosen, rejected}`` pairs flows into a user's DataModule that converts rows of
another schema, which then keeps 0 of 64 rows. Two rules, applied by appending options to the command line (so
``--print_config`` shows the result) with one note each:

1. When a config (or ``--data`` / ``--data.class_path``) changes ``data.class_path``, the inputs (:data:`INPUTS`)
   set only by *earlier* sources go back to the new class's defaults. Settings of how the rows are tokenised and
   batched (``max_length``, ``batch_size``, ...) are kept.
2. ``val_fraction > 0`` set by a source wins over a validation source set only by earlier ones (a ``val_file``,
   or a hub ``val_split``): that one is dropped, instead of the two conflicting.

A source is a ``--config`` file's ``data`` section, a ``--data`` file or class name, or a ``--data.<key>`` /
``--data.init_args.<key>`` option, in command-line order.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

INPUTS = ("train_file", "val_file", "test_file", "hub_dataset", "hub_config", "hub_kwargs", "train_split",
          "val_split", "val_fraction", "prompt_field", "chosen_field", "rejected_field", "chosen_spans_field",
          "rejected_spans_field")
"""What a data module reads and how its rows are named: inherited by another class only when given again."""

_UNSET = object()


def data_sources(argv: list[str], start_dir: str = ".") -> list[tuple[str, dict[str, Any]]]:
    """``(where, {"class_path": ..., "init_args": {...}})`` for every source of the ``data`` section in ``argv``,
    in order; unreadable files are skipped (the parser reports them)."""
    import yaml

    sources: list[tuple[str, dict[str, Any]]] = []
    i = 0
    while i < len(argv):
        arg, value = argv[i], None
        i += 1
        if not (arg in ("--config", "-c") or arg.startswith(("--config=", "--data"))):
            continue
        if "=" in arg:
            arg, value = arg.split("=", 1)
        elif i < len(argv):
            value, i = argv[i], i + 1
        if value is None:
            continue
        section: Any = None
        path = Path(start_dir, value)
        if arg in ("--config", "-c", "--data") and path.is_file():
            try:
                content = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue
            section = content if arg == "--data" else content.get("data")
        elif arg in ("--data", "--data.class_path"):
            section = {"class_path": value}
        elif arg.startswith("--data."):
            section = {"init_args": {arg.removeprefix("--data.").removeprefix("init_args."): yaml.safe_load(value)}}
        if isinstance(section, dict):
            init = {k: v for k, v in section.items() if k not in ("class_path", "init_args")}
            init.update(section.get("init_args") or {})
            sources.append((value if arg in ("--config", "-c", "--data") else arg,
                            {"class_path": section.get("class_path"), "init_args": init}))
    return sources


def settle(argv: list[str], start_dir: str = ".") -> tuple[list[str], list[str]]:
    """``(options to append to argv, notes)`` applying the two rules of this module."""
    sources = data_sources(argv, start_dir)
    last: dict[str, tuple[int, Any]] = {}  # key -> (source index, value) of the last source that sets it
    change, current = None, None
    for index, (_, section) in enumerate(sources):
        class_path = section["class_path"]
        if class_path and current and class_path != current:
            change = index
        current = class_path or current
        for key, value in section["init_args"].items():
            last[key] = (index, value)
    cls = _import(current) if current else None
    if cls is None:
        return [], []
    reset: dict[str, Any] = {}
    notes = []
    if change is not None:
        dropped = [k for k in INPUTS if k in last and last[k][0] < change and _default(cls, k) is not _UNSET]
        if dropped:
            reset.update({k: _default(cls, k) for k in dropped})
            notes.append(f"data: {sources[change][0]} changes data.class_path to {current}, so the inputs of the "
                         f"earlier data class are not carried over: {', '.join(dropped)} reset to "
                         f"{cls.__name__}'s defaults (give them after the class_path to keep them).")

    def effective(key: str) -> tuple[int, Any]:
        if key in reset or key not in last:
            return -1, _default(cls, key)
        return last[key]

    at, fraction = effective("val_fraction")
    if at >= 0 and isinstance(fraction, int | float) and fraction > 0:
        overridden = [k for k in ("val_file", "val_split") if effective(k)[1] and effective(k)[0] < at
                      and (k == "val_file" or effective("hub_dataset")[1])]
        if overridden:
            reset.update({k: None for k in overridden})
            notes.append(f"data: val_fraction={fraction} ({sources[at][0]}) holds out part of train for validation, "
                         f"so the earlier {' and '.join(overridden)} {'is' if len(overridden) == 1 else 'are'} "
                         "not used.")
    return [f"--data.init_args.{k}={_text(v)}" for k, v in reset.items()], notes


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None  # the parser names the problem


def _default(cls: type, key: str) -> Any:
    """The default of ``key`` in ``cls.__init__`` or in the first base class that declares it (a subclass may pass
    ``**kwargs`` on); ``_UNSET`` when no class declares it or it has no default."""
    for klass in cls.__mro__:
        parameter = inspect.signature(klass.__init__).parameters.get(key) if "__init__" in vars(klass) else None
        if parameter is not None:
            return _UNSET if parameter.default is inspect.Parameter.empty else parameter.default
    return _UNSET


def _text(value: Any) -> str:
    """A value as jsonargparse reads it from the command line."""
    return "null" if value is None else value if isinstance(value, str) else json.dumps(value)
