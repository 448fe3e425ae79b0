"""Cached reference statistics (``model.reference_cache``): run the frozen reference once, before training.

DPO, IPO, DPOP, WeightedDPO, BCO and the token weightings that read only label log-probs need nothing of the
reference but ``log π_ref(y^t | x, y^<t)`` of every response token, and those numbers are the same in every epoch.
With ``reference_cache: true`` the module computes them once over the training and validation splits in
``on_fit_start`` and then never runs the reference: each step reads its rows' values back by
``PreferenceBatch.row_ids`` (the index of a pair in its split, so shuffling, token-budget bucketing and the packed
layout change nothing) and scatters them into ``TokenStats.reference_logps``.

What is cached: the union of the ``TokenStats`` fields the objective and the masker declare
(``Objective.reference_cache_fields``, ``TokenMasker.reference_cache_fields``), each one a field of
:data:`CACHEABLE`. An objective or masker that reads the live reference (TDPO's full-vocabulary KL, learned masks'
block outputs, activation masks' hooks) declares None and the option is refused at start (:func:`check_cacheable`).

Where: ``<tokenised cache>/reference/<key>/`` beside the tokenised splits (``data/token_cache.py``:
``$SPARSEPO_TOKENISED_CACHE`` or ``<cache_dir()>/tokenised``), one memory-mapped Arrow file per split whose row
``k·i + s`` holds side ``s`` (chosen 0, rejected 1; unpaired examples: ``k = 1``) of split row ``i`` as a list of
float32 values, one per response token, and ``meta.json``. The key is a SHA-256 over the reference's identity (its
resolved path and the name, size and ``mtime_ns`` of each file there), the features of each split (the token cache
key when the data module has one, else the token ids themselves), the options that change the numbers (``dtype``,
``fsdp_param_dtype``, ``attn_implementation``, ``chunk_size``, ``lora``), the fields and the code (this file,
``logprobs.py``, ``models.py``, ``model_sources.py``, and the torch and transformers versions).

Ranks and resumption: the splits are cut into pieces of :data:`PIECE_ROWS` rows, written into
``.<key>.building/`` as each is done; rank ``r`` of ``W`` computes the missing pieces ``r, r + W, …`` (under FSDP2 the
ranks make the same number of reference calls, a rank short of work repeating its last batch), then rank 0 joins the
pieces into the final folder and every rank reads it. An interrupted build keeps its finished pieces: the next start
computes only the others, whatever its number of ranks. Ranks must share the file system (one machine, or a shared
cache folder).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from sparsepo_lightning.data.token_cache import cache_root
from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.masks.base import TokenMasker
from sparsepo_lightning.objectives import Objective
from sparsepo_lightning.reference_release import release
from sparsepo_lightning.types import PreferenceBatch, TokenStats, scatter_response

CACHEABLE = {"reference_logps": "log π_ref(y^t | x, y^<t) of each response token's label"}
"""The ``TokenStats`` fields a cache can hold, with what each is."""
FORMAT = 1
"""Version of the folder layout; part of the key."""
PIECE_ROWS = 256
"""Split rows per piece: the unit of work shared among ranks and of resumption."""
SPLITS = ("train", "val")
_CODE_FILES = ("reference_cache.py", "logprobs.py", "models.py", "model_sources.py")
_PACKAGE = Path(__file__).resolve().parent


def check_cacheable(objective: Objective, masker: TokenMasker | None) -> tuple[str, ...]:
    """The fields to cache for ``objective`` and ``masker``; a ``ConfigError`` with the reason when one of them needs
    the live reference."""
    name = type(objective).__name__
    if not objective.needs_reference:
        raise ConfigError(f"model.reference_cache: {name} is reference-free; there is no reference to cache. Fix: "
                          "model.reference_cache: false.")
    if objective.reference_cache_fields is None:
        raise ConfigError(
            f"model.reference_cache: {name} reads the reference's full next-token distribution at every step (the "
            "per-token KL(π_ref‖π_θ) against the current policy), which per-token statistics computed in advance "
            "cannot replace. Fix: model.reference_cache: false, or an objective that reads only label log-probs "
            "(DPO, IPO, DPOP, WeightedDPO, BCO).")
    for part in (objective, masker):
        live = _live_reads(part)
        if live:
            raise ConfigError(
                f"model.reference_cache: {type(part).__name__} reads {live} at every step, which per-token statistics "
                "computed in advance cannot replace. Fix: model.reference_cache: false.")
    fields = list(objective.reference_cache_fields)
    if masker is not None and masker.needs_reference:
        if masker.reference_cache_fields is None:
            what = "its block outputs" if masker.needs_layers else "its live outputs (hidden states or activations)"
            raise ConfigError(
                f"model.reference_cache: the masker {type(masker).__name__} reads {what} at every step, which a cache "
                "of per-token statistics cannot replace. Fix: model.reference_cache: false, or a masker that reads "
                "no reference or only its label log-probs (e.g. ExcessLossSelection).")
        fields += masker.reference_cache_fields
    unknown = sorted(set(fields) - set(CACHEABLE))
    if unknown:
        raise ConfigError(f"model.reference_cache: {', '.join(unknown)} declared cacheable, but the cache holds only "
                          f"{', '.join(CACHEABLE)}. Fix: model.reference_cache: false, or declare only those fields.")
    return tuple(sorted(set(fields)))


def _live_reads(part: Objective | TokenMasker | None) -> str:
    """What ``part`` reads from live models beyond label log-probs: full distributions or extra prompt renderings."""
    statistics = sorted(part.distribution_statistics()) if part is not None else []
    variants = sorted(part.prompt_variants()) if callable(getattr(part, "prompt_variants", None)) else []
    return " and ".join([f"full next-token distributions (distribution_statistics: {', '.join(statistics)})"] *
                        bool(statistics) + [f"log-probs under extra prompt renderings (prompt_variants: "
                                            f"{', '.join(variants)})"] * bool(variants))


class ReferenceCache:
    """The cached statistics of a run's splits, memory-mapped (:func:`prepare` builds or reads them).

    Attributes:
        folder: the cache folder.
        rows_computed: split rows this process ran the reference on while preparing it (0 when it was read).
    """

    def __init__(self, folder: Path, rows_computed: int = 0) -> None:
        import pyarrow as pa

        self.folder, self.rows_computed = folder, rows_computed
        meta = json.loads((folder / "meta.json").read_text())
        self.sides: int = meta["sides"]
        self._columns: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for split in meta["splits"]:  # the arrays keep their memory map open
            source = pa.memory_map(str(folder / f"{split}.arrow"))
            column = pa.ipc.open_file(source).read_all().column("reference_logps").combine_chunks()
            self._columns[split] = (column.offsets.to_numpy(), column.values.to_numpy(zero_copy_only=True))
        self._checked: set[str] = set()

    def has(self, split: str) -> bool:
        return split in self._columns

    def reference_logps(self, split: str, batch: PreferenceBatch, response_mask: Tensor) -> Tensor:
        """``(rows, T-1)`` float32 cached ``log π_ref`` of the batch's response tokens (0 elsewhere), found by
        ``batch.row_ids``. Host work only (numpy gather, one copy to the device), no sync, except on the first batch
        of each split: there it checks that every row has as many cached values as response tokens."""
        if batch.row_ids is None:
            raise ConfigError("model.reference_cache: the batch carries no row ids (PreferenceBatch.row_ids), so "
                              "its rows cannot be matched to their cached statistics. Fix: serve batches with "
                              "PreferenceDataModule's loaders (or wrap a custom dataset in data.collate.WithRowIds), "
                              "or model.reference_cache: false.")
        offsets, values = self._columns[split]
        ids = np.asarray(batch.row_ids, dtype=np.int64)
        sides = 1 if batch.desirable is not None else 2
        if sides != self.sides or ids.min() < 0 or (ids.max() + 1) * sides >= len(offsets):
            raise ConfigError(f"model.reference_cache: batch rows {batch.row_ids} do not match the cached {split} "
                              f"split ({(len(offsets) - 1) // self.sides} rows of {self.sides} side(s)) in "
                              f"{self.folder}. Fix: delete that folder and start again.")
        rows = (ids[None, :] * sides + np.arange(sides)[:, None]).reshape(-1)  # batch row order: side-major
        starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        flat = torch.from_numpy(values[np.repeat(starts, lengths) + within]).to(response_mask.device)
        if split not in self._checked:
            counts = response_mask.sum(1).cpu().numpy()
            if not np.array_equal(counts, lengths):
                raise ConfigError(f"model.reference_cache: the cached {split} rows {batch.row_ids} hold {lengths} "
                                  f"values but the batch has {counts} response tokens per row ({self.folder}). Fix: "
                                  "delete that folder and start again.")
            self._checked.add(split)
        return scatter_response(flat, response_mask)


class CachedReference(Callback):
    """``model.reference_cache`` in a run (``PreferenceModule`` holds one, ``checks.reference_cache`` makes it):
    builds or reads the cache in ``on_fit_start``, then tells the step whether a split is served (the reference is
    then not run) and fills the step's statistics. Inactive (serves nothing) when the option is off, and for splits
    it does not hold (``test``).

    Attributes:
        fields: the ``TokenStats`` fields cached (:func:`check_cacheable`); empty when inactive.
        cache: the cache once prepared, else None.
    """

    def __init__(self, objective: Objective, masker: TokenMasker | None, enabled: bool) -> None:
        self.fields = check_cacheable(objective, masker) if enabled else ()
        self.cache: ReferenceCache | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.fields:
            self.cache = prepare(pl_module, trainer, self.fields)
            released = release(pl_module, trainer)  # no step of this fit runs the reference
            if released:
                rank_zero_info(f"reference cache: {released}")

    def serves(self, split: str) -> bool:
        """True when the cache holds ``split`` (``train``, ``val``): its steps do not run the reference."""
        return self.cache is not None and self.cache.has(split)

    def fill(self, stats: TokenStats, split: str, batch: PreferenceBatch) -> TokenStats:
        """``stats`` with ``reference_logps`` read from the cache when it serves ``split``, else ``stats``."""
        if self.serves(split):
            stats.reference_logps = self.cache.reference_logps(split, batch, stats.response_mask)
        return stats


# -- building ------------------------------------------------------------------------------------------------


def prepare(module: Any, trainer: Any, fields: tuple[str, ...]) -> ReferenceCache:
    """Read the cache of the run's training and validation splits, or build it first (every rank its share)."""
    dm = trainer.datamodule
    datasets = getattr(dm, "datasets", None)
    if not isinstance(datasets, Mapping) or not datasets.get("train"):
        raise ConfigError("model.reference_cache needs a PreferenceDataModule (or subclass) whose set-up splits it "
                          "can read (dm.datasets['train']). Fix: fit with datamodule=..., or model.reference_cache: "
                          "false.")
    splits = {split: datasets[split] for split in SPLITS if datasets.get(split)}
    key, parts = cache_key(module, dm, splits, fields)
    folder = cache_root() / "reference" / key
    computed = 0
    if _read_meta(folder) is None:
        computed = _build(module, trainer, dm, splits, folder, parts)
    trainer.strategy.barrier()
    if computed or trainer.global_rank == 0:
        rank_zero_info(f"reference cache: {'built' if computed else 'read'} {folder}")
    return ReferenceCache(folder, computed)


def cache_key(module: Any, dm: Any, splits: Mapping[str, Sequence[Mapping[str, Any]]],
              fields: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """``(folder name, what went into it)``: see the module docstring for what the key covers."""
    hp = module.hparams
    parts = {
        "format": FORMAT,
        "fields": list(fields),
        "reference": reference_identity(hp.get("reference") or hp["model"]),
        "options": {name: hp.get(name) for name in ("dtype", "fsdp_param_dtype", "attn_implementation", "chunk_size",
                                                    "lora", "trust_remote_code")},
        "data": {split: _features_identity(dm, split, features) for split, features in splits.items()},
        "code": code_version(),
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return f"{'+'.join(splits)}-{digest[:24]}", parts


def reference_identity(name: str) -> dict[str, Any]:
    """The reference as the key sees it: the name, its resolved path and each file there (name, size, mtime)."""
    from sparsepo_lightning.model_sources import resolve_model_path

    path = Path(resolve_model_path(name))
    files = sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
                   for f in path.rglob("*") if f.is_file()) if path.is_dir() else []
    return {"name": name, "path": str(path.resolve()) if path.exists() else str(path), "files": files}


def code_version() -> str:
    """SHA-256 of the files that compute the cached numbers and of the torch and transformers versions."""
    sources = [(name, hashlib.sha256((_PACKAGE / name).read_bytes()).hexdigest()) for name in _CODE_FILES]
    versions = [importlib.metadata.version(name) for name in ("torch", "transformers")]
    return hashlib.sha256(json.dumps([sources, versions]).encode()).hexdigest()


def _features_identity(dm: Any, split: str, features: Sequence[Mapping[str, Any]]) -> Any:
    """The token cache's key of the split when the data module has one (it covers the data, the options, the
    tokenizer and the data code), else the SHA-256 of the features' token ids and labels."""
    from sparsepo_lightning.data import token_cache

    if getattr(dm, "cache_tokenised", False):
        with_key = token_cache.cache_key(dm, ("train", "val"))  # the splits a fit sets up together
        if with_key is not None:
            return [with_key[0], len(features)]
    digest = hashlib.sha256()
    for feature in features:
        digest.update(json.dumps({k: v for k, v in feature.items() if "input_ids" in k or "labels" in k},
                                 sort_keys=True).encode())
    return [digest.hexdigest(), len(features)]


def _build(module: Any, trainer: Any, dm: Any, splits: Mapping[str, Sequence[Mapping[str, Any]]], folder: Path,
           parts: dict[str, Any]) -> int:
    """Compute this rank's share of the missing pieces, then (rank 0) join them; returns the rows computed here."""
    from tqdm.auto import tqdm

    strategy, rank, world = trainer.strategy, trainer.global_rank, trainer.world_size
    building = folder.with_name(f".{folder.name}.building")
    building.mkdir(parents=True, exist_ok=True)
    strategy.barrier()  # every rank lists the pieces done before any rank writes one
    pieces = [(split, start) for split, features in splits.items() for start in range(0, len(features), PIECE_ROWS)]
    missing = [piece for piece in pieces if not (building / _piece_name(*piece)).is_file()]
    strategy.barrier()
    batch_size = max(1, int(getattr(dm, "batch_size", 8) or 8))
    plans = [[(split, batch) for split, start in missing[r::world]
              for batch in _piece_batches(splits[split], start, batch_size)] for r in range(world)]
    calls = max(map(len, plans)) if module._sharded else len(plans[rank])  # FSDP2: every rank the same calls
    mine = plans[rank]
    done: dict[tuple[str, int], dict[int, np.ndarray]] = {}
    rows = sum(len(batch) for _, batch in mine)
    with tqdm(total=rows, desc=f"reference cache (rank {rank})", disable=rank != 0 or not rows, leave=False) as bar:
        for call in range(calls):
            split, batch = mine[min(call, len(mine) - 1)] if mine else (next(iter(splits)), [0])
            values = _reference_values(module, dm, splits[split], batch)
            if call >= len(mine):  # a padding call (FSDP2): nothing to keep
                continue
            piece = (split, batch[0] - batch[0] % PIECE_ROWS)
            done.setdefault(piece, {}).update(values)
            bar.update(len(batch))
            if len(done[piece]) == _sides(dm) * (min(piece[1] + PIECE_ROWS, len(splits[split])) - piece[1]):
                _write_piece(building / _piece_name(*piece), done.pop(piece))
    strategy.barrier()
    if rank == 0:
        _join(building, folder, splits, parts, _sides(dm))
    return rows


def _piece_batches(features: Sequence[Mapping[str, Any]], start: int, batch_size: int) -> list[list[int]]:
    """The rows of a piece in batches of ``batch_size``, longest first (less padding)."""
    indices = range(start, min(start + PIECE_ROWS, len(features)))
    ordered = sorted(indices, key=lambda i: -max(len(v) for k, v in features[i].items() if k.endswith("input_ids")))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def _sides(dm: Any) -> int:
    from sparsepo_lightning.data.collate import collate_examples

    return 1 if getattr(dm, "collate_fn", None) is collate_examples else 2


def _reference_values(module: Any, dm: Any, features: Sequence[Mapping[str, Any]],
                      rows: list[int]) -> dict[int, np.ndarray]:
    """The reference's label log-probs of ``rows`` by cache row (``sides·i + s``), as the step would compute them."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from sparsepo_lightning.logprobs import token_stats

    batch = dm.collate_fn([features[i] for i in rows], pad_token_id=dm.pad_token_id)
    batch = move_data_to_device(batch, module.device)
    labels, response_mask = batch.shifted_labels()
    with torch.no_grad() if module._sharded else torch.inference_mode():
        reference = module._reference_outputs(batch)
        stats = token_stats(reference.last_hidden, labels, response_mask, reference.head, with_kl=False,
                            chunk_size=module.hparams.chunk_size)
        per_row = stats.policy_logps[response_mask].float().cpu().split(response_mask.sum(1).tolist())
    n, sides = len(rows), response_mask.shape[0] // len(rows)
    return {sides * rows[j % n] + j // n: values.numpy().copy() for j, values in enumerate(per_row)}


def _piece_name(split: str, start: int) -> str:
    return f"{split}-{start:010d}.arrow"


def _write_piece(path: Path, values: dict[int, np.ndarray]) -> None:
    """One piece, atomically (a temporary file renamed into place): an interrupted write leaves no piece."""
    order = sorted(values)
    _write_table(path, order, [values[i] for i in order])


def _write_table(path: Path, rows: list[int], values: list[np.ndarray]) -> None:
    import pyarrow as pa

    column = pa.array(values, type=pa.large_list(pa.float32()))
    table = pa.table({"row": pa.array(rows, type=pa.int64()), "reference_logps": column})
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(temporary, path)


def _join(building: Path, folder: Path, splits: Mapping[str, Sequence[Any]], parts: dict[str, Any],
          sides: int) -> None:
    """Join the pieces of each split into ``<split>.arrow`` (row ``sides·i + s``) in a new folder renamed into
    place, and drop the pieces."""
    import pyarrow as pa

    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for split, features in splits.items():
            tables = []
            for start in range(0, len(features), PIECE_ROWS):
                with pa.memory_map(str(building / _piece_name(split, start))) as source:
                    tables.append(pa.ipc.open_file(source).read_all())
            table = pa.concat_tables(tables).combine_chunks()
            if table.column("row").to_pylist() != list(range(sides * len(features))):
                raise RuntimeError(f"reference cache: the pieces of the {split} split in {building} do not cover its "
                                   f"{len(features)} rows; delete that folder and start again.")
            with pa.OSFile(str(staging / f"{split}.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                w.write_table(table)
        meta = {"format": FORMAT, "sides": sides, "splits": {s: len(f) for s, f in splits.items()}, "key": parts}
        (staging / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        try:
            os.rename(staging, folder)
        except OSError:
            if _read_meta(folder) is None:  # a damaged folder under this key: replace it
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(building, ignore_errors=True)


def _read_meta(folder: Path) -> dict[str, Any] | None:
    """The folder's ``meta.json`` if it is a complete cache of this format, else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        complete = all((folder / f"{split}.arrow").is_file() for split in meta["splits"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if complete and meta.get("format") == FORMAT else None
