"""Tokenise once: the tokenised splits of a data module, kept as memory-mapped Arrow files for the next start.

Reading, validating and tokenising costs about 1 ms per pair on a CPU core, on every start and every rank (minutes
for Anthropic HH). With ``cache_tokenised`` (the default) ``PreferenceDataModule`` keeps the result under
``<cache_dir()>/tokenised/<key>/`` and a later start with the same key reads it back in about a second. The key is a
SHA-256 over everything that shapes the features (:func:`cache_key`):

- the sources: a local file's resolved path, size, ``mtime_ns`` and the SHA-256 of its bytes; a hub split's name,
  config, split and ``hub_kwargs`` and the loaded dataset's ``_fingerprint``;
- the data module's class (qualified name) and its init arguments except those that only batch
  (:data:`BATCHING_OPTIONS`), read from the module's attributes where it has one of the same name (so an option
  changed after ``__init__`` counts); ``seed`` only where it seeds the ``val_fraction`` hold-out;
- the tokenizer: class, ``name_or_path``, the SHA-256 of its serialisation (``backend_tokenizer.to_str()``), chat
  template and special token ids;
- the code: the source of ``sparsepo_lightning/data/*.py`` (but the modules that only batch) and of the files
  defining the module's classes and hooks (their source where there is no file, e.g. a notebook cell; a module
  whose code has neither, e.g. made by ``exec``, is not cached), and the versions of ``transformers``,
  ``tokenizers`` and ``datasets``.

A folder holds the splits one ``setup`` builds together (``train`` and ``val``, or ``val``, or ``test``): per split
``<split>.arrow`` (the features ``tokenize_fn`` returned minus the truncation counters, and a ``__source__`` column of
row locations) and ``meta.json`` (what went into the key and each split's :class:`DataReport`, rejected rows with
their locations and messages included). It is written into a temporary folder beside it and renamed into place, so
nobody reads half a cache; when two processes build the same key at once, the second rename fails and that process
reads the first one's folder. A split read back is a :class:`CachedFeatures`.

Ranks: Lightning calls ``prepare_data`` on local rank 0, then ``setup`` on every rank after a barrier; the data
module builds the cache in ``prepare_data`` and every rank reads it in ``setup``. Without a trainer (tests,
notebooks) ``setup`` builds a missing cache itself. ``$SPARSEPO_TOKENISED_CACHE`` replaces
``<cache_dir()>/tokenised`` (the test suite points it at a temporary folder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from sparsepo_lightning.checkpointing import umask_mode
from sparsepo_lightning.data.arrow_features import read_features, write_features
from sparsepo_lightning.data.readers import load_hub_split
from sparsepo_lightning.data.rows import DataReport, RowIssue
from sparsepo_lightning.data.splits import log_report
from sparsepo_lightning.model_sources import cache_dir

CACHE_ENV_VAR = "SPARSEPO_TOKENISED_CACHE"
"""Environment variable: the folder of tokenised caches, instead of ``<cache_dir()>/tokenised``."""
BATCHING_OPTIONS = frozenset({"batch_size", "num_workers", "layout", "pack_length", "max_tokens", "num_proc",
                              "cache_tokenised"})
"""Init arguments that change how features are batched or built, never what they are: not part of the key."""
FORMAT = 1
"""Version of the folder layout; part of the key."""
_BATCHING_MODULES = frozenset({"collate.py", "sampler.py", "batching.py", "packing.py"})
_DATA_DIR = Path(__file__).resolve().parent
_FILE_HASHES: dict[tuple[str, int, int], str] = {}
"""SHA-256 of local files by ``(resolved path, size, mtime_ns)``: a file is hashed once per process, unless it was
modified less than ``_SETTLED_NS`` ago (timestamps are coarser than writes: the same file could be rewritten with
the same size and time)."""
_SETTLED_NS = 2_000_000_000


def cache_root() -> Path:
    """The folder of tokenised caches: ``$SPARSEPO_TOKENISED_CACHE`` if set, else ``<cache_dir()>/tokenised``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else cache_dir() / "tokenised"


def cached_setup(dm: Any, splits: tuple[str, ...], build: Callable[[], None]) -> None:
    """Set up ``splits`` of the data module ``dm`` from the cache, or by ``build()`` and then cache them.

    ``build`` is the uncached path: it fills ``dm.datasets``, ``dm.sources`` and ``dm.report`` for ``splits`` and logs
    the reports. A hit fills them from the cache and logs the same reports. With ``dm.cache_tokenised`` off this only
    calls ``build``. A cache that cannot be written (read-only folder, features Arrow cannot hold) is a warning.
    """
    if not dm.cache_tokenised:
        build()
        return
    if (keyed := cache_key(dm, splits)) is None:
        rank_zero_info(f"data: not caching the tokenised splits: the code of {type(dm).__qualname__} or of its hooks "
                       "has no source to version the cache by.")
        build()
        return
    key, parts = keyed
    folder = cache_root() / key
    meta = _read_meta(folder)
    if meta is not None:
        try:
            _install(dm, folder, meta, log=True)
        except (OSError, ValueError, KeyError) as error:  # a damaged folder: build again, in its place
            rank_zero_warn(f"data: the tokenised cache {folder} is unreadable ({error}); tokenising again.")
            _discard(folder)
        else:
            rank_zero_info(f"data: read the tokenised {' and '.join(splits)} split(s) from {folder}")
            for checked in [k for k in dm._checked if k[0] in splits]:  # pairs check_sources kept for a build
                del dm._checked[checked]
            return
    build()
    try:
        _install(dm, folder, _write(folder, parts, dm, splits), log=False)  # serve what the next start will read
    except (OSError, ValueError, TypeError, KeyError) as error:  # pyarrow's errors derive from these
        rank_zero_warn(f"data: could not cache the tokenised splits in {folder} ({type(error).__name__}: {error}); "
                       "this start tokenised them, the next will again. Fix: make the folder writable or set "
                       f"${CACHE_ENV_VAR}, or set data.cache_tokenised: false.")
        return
    rank_zero_info(f"data: cached the tokenised {' and '.join(splits)} split(s) in {folder}")


def cache_key(dm: Any, splits: tuple[str, ...]) -> tuple[str, dict[str, Any]] | None:
    """``(folder name, what went into it)`` for ``splits`` of ``dm``: ``<Class>-<splits>-<sha256 prefix>``; ``None``
    when the module's code cannot be versioned (:func:`code_version`)."""
    if (code := code_version(dm)) is None:
        return None
    parts = {
        "format": FORMAT,
        "splits": list(splits),
        "module": _qualified(type(dm)),
        "options": _options(dm),
        "sources": [_source_fingerprint(dm, split) for split in splits],
        "tokenizer": tokenizer_fingerprint(dm.tokenizer),
        "code": code,
    }
    digest = hashlib.sha256(_json(parts).encode()).hexdigest()
    return f"{type(dm).__name__}-{'+'.join(splits)}-{digest[:24]}", parts


def checked_before(dm: Any, split: str, path: str) -> bool:
    """True when ``check_sources`` found a valid row in this very file (same bytes) with the same options and code."""
    return bool(dm.cache_tokenised) and (marker := _checked_marker(dm, split, path)) is not None and marker.is_file()


def remember_checked(dm: Any, split: str, path: str) -> None:
    """Record that ``path`` passed ``check_sources`` (best effort: an unwritable folder only costs a re-check)."""
    if not dm.cache_tokenised:
        return
    if (marker := _checked_marker(dm, split, path)) is None:
        return
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass


# -- the key -----------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """What a tokenizer contributes to the key: class, ``name_or_path``, SHA-256 of its serialisation (the fast
    tokenizer's JSON without the call-time ``truncation``/``padding`` state; else vocabulary and vocabulary files),
    chat template and special token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        serialised = backend.to_str()  # the usual state between calls: no need to parse 1-10 MB of JSON
    elif backend is not None:
        state = json.loads(backend.to_str())
        for call_state in ("truncation", "padding"):
            state.pop(call_state, None)
        serialised = _json(state)
    else:
        files = [getattr(tokenizer, "vocab_file", None), *getattr(tokenizer, "vocab_files_names", {}).values()]
        serialised = _json({"vocab": sorted(tokenizer.get_vocab().items()),
                            "files": [_sha256(Path(f)) for f in files if isinstance(f, str) and Path(f).is_file()]})
    return {
        "class": _qualified(type(tokenizer)),
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "serialisation": hashlib.sha256(serialised.encode()).hexdigest(),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_ids": {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")},
    }


def code_version(dm: Any) -> str | None:
    """SHA-256 of the code that makes features: ``sparsepo_lightning/data/*.py`` but the modules that only batch, the
    files (or, without a file, the source) defining ``dm``'s classes and its ``validate_fn``/``tokenize_fn``/
    ``convert_rows`` hooks, and the versions of ``transformers``, ``tokenizers`` and ``datasets``. ``None`` when some
    of that code has no source to hash (e.g. a class made by ``exec``): such a module is not cached."""
    sources = {(f.name, hashlib.sha256(f.read_bytes()).hexdigest()) for f in _DATA_DIR.glob("*.py")
               if f.name not in _BATCHING_MODULES}
    classes = type(dm).__mro__[: type(dm).__mro__.index(LightningDataModule)]
    for code in (*classes, dm.validate_fn, dm.tokenize_fn, dm.convert_rows):
        if (identity := _source_identity(code)) is None:
            return None
        sources.add(identity)
    versions = [importlib.metadata.version(name) for name in ("transformers", "tokenizers", "datasets")]
    return hashlib.sha256(_json([versions, sorted(sources)]).encode()).hexdigest()


def _source_identity(code: Any) -> tuple[str, str] | None:
    """``(file name, SHA-256 of the file)`` of a class or function, else the SHA-256 of its source (a notebook
    cell), else, for a class, of its functions' sources; ``None`` when there is none."""
    code = inspect.unwrap(getattr(code, "__func__", code))
    with contextlib.suppress(TypeError, OSError):
        if (path := Path(inspect.getfile(code))).is_file():
            return path.name, hashlib.sha256(path.read_bytes()).hexdigest()
    with contextlib.suppress(TypeError, OSError):
        return "source", hashlib.sha256(inspect.getsource(code).encode()).hexdigest()
    if inspect.isclass(code):
        functions = [_source_identity(v) for v in vars(code).values() if inspect.isfunction(getattr(v, "__func__", v))]
        if all(functions):
            return "class", hashlib.sha256(_json(sorted(functions)).encode()).hexdigest()
    return None


def _options(dm: Any) -> dict[str, Any]:
    """The init arguments that shape features, as the module now holds them, and the hooks' qualified names."""
    options = {}
    for name, value in dict(dm.hparams).items():
        if name not in BATCHING_OPTIONS:
            current = getattr(dm, name, value) if name != "tokenizer" else value
            options[name] = value if callable(current) else current
    if not dm.val_fraction:
        options.pop("seed", None)  # seeds only the hold-out (and the shuffle, at batching time)
    options["fields"] = dataclasses.asdict(dm.fields)
    options["hooks"] = [_qualified(h) for h in (dm.validate_fn, dm.tokenize_fn, dm.convert_rows)]
    return options


def _source_fingerprint(dm: Any, split: str) -> dict[str, Any] | None:
    """The source ``split`` reads (``None``: none); a ``val_fraction`` hold-out reads train, part of the key too."""
    path = getattr(dm, f"{split}_file", None)
    if path:
        return {"split": split, **_file_fingerprint(path)}
    hub_split = {"train": dm.train_split, "val": dm.val_split}.get(split)
    if dm.hub_dataset is None or hub_split is None:
        return None
    dataset = load_hub_split(dm.hub_dataset, dm.hub_config, hub_split, **dm.hub_kwargs)
    return {"split": split, "hub_dataset": dm.hub_dataset, "hub_config": dm.hub_config, "hub_split": hub_split,
            "hub_kwargs": dm.hub_kwargs, "fingerprint": getattr(dataset, "_fingerprint", None)}


def _file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Resolved path, size, ``mtime_ns`` and SHA-256 of a local file (``missing`` when it cannot be read: the build
    then raises the reader's error)."""
    resolved = Path(path).resolve()
    try:
        stat = resolved.stat()
        memo = (str(resolved), stat.st_size, stat.st_mtime_ns)
        digest = _FILE_HASHES.get(memo) or _sha256(resolved)
    except OSError:
        return {"path": str(resolved), "missing": True}
    if time.time_ns() - stat.st_mtime_ns > _SETTLED_NS:  # a file written just now may change within one mtime tick
        _FILE_HASHES[memo] = digest
    return {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}


def _checked_marker(dm: Any, split: str, path: str) -> Path | None:
    if (code := code_version(dm)) is None:
        return None
    parts = {"format": FORMAT, "split": split, "module": _qualified(type(dm)), "options": _options(dm),
             "file": _file_fingerprint(path), "code": code}
    return cache_root() / "checked" / hashlib.sha256(_json(parts).encode()).hexdigest()


# -- reading and writing -----------------------------------------------------------------------------------


def _read_meta(folder: Path) -> dict[str, Any] | None:
    """The folder's ``meta.json`` if the folder is a complete cache of this format, else ``None``."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        complete = all(info is None or (folder / f"{split}.arrow").is_file() for split, info in meta["splits"].items())
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return meta if complete and meta.get("format") == FORMAT else None


def _install(dm: Any, folder: Path, meta: dict[str, Any], log: bool) -> None:
    """Fill ``dm.datasets``/``sources``/``report`` from a cache folder (and log the reports, as a build does)."""
    for split, info in meta["splits"].items():
        if info is None:  # a split without a source, e.g. no validation data
            dm.datasets[split] = []
            continue
        dm.datasets[split], dm.sources[split] = read_features(folder / f"{split}.arrow")
        dm.report[split] = _report_from_json(info["report"])
        if log:
            log_report(split, dm.report[split])


def _write(folder: Path, parts: dict[str, Any], dm: Any, splits: tuple[str, ...]) -> dict[str, Any]:
    """Write ``splits`` of ``dm`` into ``folder`` atomically; return its meta (the other process's if it won)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    building.chmod(umask_mode(0o777))  # mkdtemp makes it owner-only; the cache may be shared
    try:
        meta: dict[str, Any] = {"format": FORMAT, "key": parts, "splits": {}}
        for split in (s for s in splits if s in dm.datasets):
            if not dm.datasets[split]:
                meta["splits"][split] = None
                continue
            write_features(building / f"{split}.arrow", dm.datasets[split], dm.sources[split])
            meta["splits"][split] = {"rows": len(dm.datasets[split]), "report": _report_to_json(dm.report[split])}
        (building / "meta.json").write_text(json.dumps(meta, indent=1, default=str))  # unsorted: keeps count order
        try:
            os.rename(building, folder)
        except OSError:
            if (winner := _read_meta(folder)) is not None:  # another process renamed its build first: read that one
                return winner
            _discard(folder)  # a damaged folder under this key: replace it
            os.rename(building, folder)
        return meta
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _discard(folder: Path) -> None:
    """Remove a folder, after renaming it aside so that no reader sees it half deleted."""
    aside = folder.with_name(f".{folder.name}.discarded-{uuid.uuid4().hex}")
    try:
        os.rename(folder, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _report_to_json(report: DataReport) -> dict[str, Any]:
    """The report as JSON data (key order kept: the summary lists task-specific reasons in order of appearance)."""
    data = json.loads(json.dumps(dataclasses.asdict(report)))
    restored = _report_from_json(data)
    if restored != report or restored.summary() != report.summary():
        raise ValueError(f"the data report of {report.source} does not survive JSON")
    return data


def _report_from_json(data: dict[str, Any]) -> DataReport:
    return DataReport(**{**data, "first": {reason: RowIssue(**issue) for reason, issue in data["first"].items()}})


# -- helpers -----------------------------------------------------------------------------------------------


def _qualified(obj: Any) -> str:
    obj = getattr(obj, "__func__", obj)
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json(value: Any) -> str:
    """Deterministic JSON (sorted keys) to hash; paths and other objects as ``str``."""
    return json.dumps(value, sort_keys=True, default=str)
