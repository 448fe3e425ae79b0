"""``sparsepo export <checkpoint> <out_dir>``: the trained policy as a Hugging Face checkpoint, plus the mask networks.

The checkpoint is a ``.ckpt`` file written by ``sparsepo fit`` or the distributed checkpoint folder of an FSDP2
run (read in one process, no GPU or process group; :mod:`sparsepo_lightning.checkpoint_reading`). ``out_dir``
(new or empty; nothing is overwritten) receives:

- the policy in ``save_pretrained`` layout (safetensors) and its tokenizer, loadable by
  ``AutoModelForCausalLM.from_pretrained(out_dir)`` / ``AutoTokenizer.from_pretrained(out_dir)``; LoRA adapters
  are merged into the base weights, or with ``--lora adapter`` saved as a PEFT adapter
  (``adapter_config.json`` + ``adapter_model.safetensors``, ``PeftModel.from_pretrained(base, out_dir)``);
- with learned masks: ``masks.safetensors`` (the ``masker.*`` tensors, prefix removed, float32) and
  ``masks.json`` (masker class and init args, tensor shapes, source); reload with `load_masks`;
- ``export.json``: source checkpoint, step, base model, reference, dtype, LoRA mode.

Example::

    sparsepo export runs/imdb/version_0/checkpoints/last.ckpt exported/imdb --dtype bfloat16
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from sparsepo_lightning.commands import PlainRawFormatter
from sparsepo_lightning.errors import ConfigError, MissingFileError, OutputExistsError

if TYPE_CHECKING:  # imported where used: `sparsepo export --help` imports neither torch nor transformers
    from torch import Tensor, nn

    from sparsepo_lightning.checkpoint_reading import TrainedCheckpoint
    from sparsepo_lightning.masks.base import TokenMasker

log = logging.getLogger(__name__)

LoraMode = Literal["merged", "adapter"]
MASKS_FILE = "masks.safetensors"
MASKS_INFO = "masks.json"
EXPORT_INFO = "export.json"
_OPTION = "the <checkpoint> argument of `sparsepo export`"


@dataclass
class ExportedMasks:
    """Mask-network weights written by ``sparsepo export``, with what is needed to rebuild the masker."""

    state_dict: dict[str, Tensor]
    """The masker's ``state_dict`` (keys without the ``masker.`` prefix)."""
    class_path: str | None
    """Import path of the masker class, e.g. ``sparsepo_lightning.masks.LearnedMasker``; None if unknown."""
    init_args: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    """The whole ``masks.json`` (source checkpoint, reference name, tensor shapes, where the class came from)."""

    def build(self, reference: nn.Module) -> TokenMasker:
        """A new masker of the exported class, bound to ``reference`` (``info["reference"]``, or a model of the same
        architecture such as the exported policy), holding the exported weights.

        Raises:
            ValueError: the class is unknown or not a ``TokenMasker``, or the weights do not fit it.
        """
        masker = _masker_class(self.class_path)(**self.init_args)
        masker.bind(reference)
        try:
            masker.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as e:
            raise ValueError(f"the exported masks do not fit {self.class_path}({self.init_args}) bound to "
                             f"{type(reference).__name__}: {e}") from e  # fmt: skip
        return masker


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32",
                      lora: LoraMode = "merged") -> Path:  # fmt: skip
    """Write the policy, tokenizer, masks and provenance of a training checkpoint into ``out_dir``.

    Everything is written to a hidden sibling folder first and renamed into place when complete.

    Raises:
        FileExistsError: ``out_dir`` exists and is not an empty folder.
        FileNotFoundError: ``checkpoint`` does not exist.
        ValueError: not a PreferenceModule checkpoint, weights that do not fit the base model, or
            ``lora="adapter"`` for a checkpoint trained without LoRA.
    """
    from sparsepo_lightning.checkpoint_reading import build_policy, read_checkpoint
    from sparsepo_lightning.checkpointing import umask_mode
    from sparsepo_lightning.model_sources import load_tokenizer

    out = Path(out_dir)
    _check_out_dir(out)
    trained = read_checkpoint(checkpoint, option=_OPTION)
    if lora == "adapter" and trained.lora is None:
        raise ConfigError(f"--lora adapter: {trained.path} was trained without LoRA (hyper_parameters['lora'] is "
                         "null), so it has no adapter to save. Fix: drop --lora.")  # fmt: skip
    policy = build_policy(trained, dtype, merge_lora=lora == "merged")
    tokenizer = load_tokenizer(trained.tokenizer_name, trust_remote_code=bool(trained.hparams.get("trust_remote_code")))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(umask_mode(0o777))  # mkdtemp makes it owner-only; an export is meant to be shared
    try:
        policy.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        has_masks = _write_masks(trained, staging)
        _write_json(staging / EXPORT_INFO, _provenance(trained, dtype, lora, has_masks))
        _check_out_dir(out)  # again: nothing may have appeared there meanwhile
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # no-op after the rename
    log.info("Exported %s (step %s) to %s", trained.path, trained.global_step, out)
    return out


def load_masks(out_dir: str | Path) -> ExportedMasks:
    """The mask networks of an export: ``load_masks(out).build(reference)`` gives a ready masker.

    Raises:
        FileNotFoundError: ``out_dir`` holds no ``masks.safetensors`` (the checkpoint had no mask weights).
    """
    from safetensors.torch import load_file

    out = Path(out_dir)
    if not (out / MASKS_FILE).is_file():
        raise MissingFileError(f"{out / MASKS_FILE} does not exist: {out} is not a `sparsepo export` folder, or "
                                "the exported checkpoint had no mask networks (e.g. uniform or activation masks).")
    info = json.loads((out / MASKS_INFO).read_text())
    masker = info.get("masker") or {}
    return ExportedMasks(load_file(str(out / MASKS_FILE)), masker.get("class_path"), masker.get("init_args") or {},
                         info)  # fmt: skip


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} already exists and is not an empty folder; `sparsepo export` never "
                              "overwrites. Fix: give a new output folder, or move/delete that one first.")


def _write_masks(trained: TrainedCheckpoint, out: Path) -> bool:
    """``masks.safetensors`` + ``masks.json`` when the checkpoint has ``masker.*`` tensors; returns whether it had.
    A masker's extra state (``_extra_state``, e.g. the draw counter of random maskers) is training progress, not
    weights: it is not exported."""
    from safetensors.torch import save_file
    from torch import Tensor

    from sparsepo_lightning.checkpoint_reading import MASKER_PREFIX

    state = {k: v.detach().contiguous() for k, v in trained.tensors(MASKER_PREFIX).items() if isinstance(v, Tensor)}
    if not state:
        return False
    save_file(state, str(out / MASKS_FILE), metadata={"format": "pt"})
    masker, source = _masker_config(trained, state)
    shapes = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state.items()}
    _write_json(out / MASKS_INFO, {
        "masker": masker,
        "masker_source": source,
        "reference": trained.reference_name,
        "source_checkpoint": str(trained.path.resolve()),
        "global_step": trained.global_step,
        "tensors": shapes,
    })  # fmt: skip
    return True


def _masker_config(trained: TrainedCheckpoint, state: dict[str, Tensor]) -> tuple[dict | None, str | None]:
    """The masker's ``{class_path, init_args}`` and where it was found.

    ``PreferenceModule`` does not save the masker among its hyper-parameters, so the source is the ``config.yaml``
    LightningCLI writes into the run's log folder (``<log_dir>/checkpoints/<checkpoint>``: one or two levels up),
    if it describes the same base model; else the class is inferred from the tensor names (learned masks only).
    """
    for config_file in (trained.path.parent / "config.yaml", trained.path.parent.parent / "config.yaml"):
        if not config_file.is_file():
            continue
        model = (yaml.safe_load(config_file.read_text()) or {}).get("model") or {}
        masker = model.get("masker")
        if model.get("model") == trained.model_name and masker:
            masker = {"class_path": masker, "init_args": {}} if isinstance(masker, str) else masker
            return {"class_path": masker["class_path"], "init_args": masker.get("init_args") or {}}, str(config_file)
    if any(k.startswith("reward_net.") for k in state):
        independent = any(k.startswith("kl_net.") for k in state)
        masker = {"class_path": "sparsepo_lightning.masks.LearnedMasker", "init_args": {"independent": independent}}
        return masker, "inferred from the tensor names (no config.yaml of the run found); other init args: defaults"
    return None, None


def _provenance(trained: TrainedCheckpoint, dtype: str, lora: LoraMode, has_masks: bool) -> dict[str, Any]:
    return {
        "source_checkpoint": str(trained.path.resolve()),
        "checkpoint_format": "distributed" if trained.distributed else "lightning_ckpt",
        "global_step": trained.global_step,
        "epoch": trained.epoch,
        "model": trained.model_name,
        "reference": trained.reference_name,
        "tokenizer": trained.tokenizer_name,
        "dtype": dtype,
        "training_dtype": trained.hparams.get("dtype"),
        "lora": None if trained.lora is None else lora,
        "lora_config": trained.lora,
        "masks": MASKS_FILE if has_masks else None,
    }


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


def _masker_class(class_path: str | None) -> type[TokenMasker]:
    from sparsepo_lightning.masks.base import TokenMasker

    if not class_path or "." not in class_path:
        raise ValueError(f"masks.json names no masker class ({class_path!r}). Fix: set masker.class_path to the "
                         "masker the run used, e.g. sparsepo_lightning.masks.LearnedMasker.")  # fmt: skip
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, TokenMasker)):
        raise ValueError(f"masks.json: {class_path} is not a TokenMasker class.")
    return cls


def parser() -> argparse.ArgumentParser:
    """The ``sparsepo export`` parser."""
    p = argparse.ArgumentParser(prog="sparsepo export", description=__doc__,
                                formatter_class=PlainRawFormatter)  # fmt: skip
    p.add_argument("checkpoint", help="A .ckpt file written by `sparsepo fit`, or the checkpoint folder of an FSDP2 "
                                      "run (ModelParallelStrategy).")  # fmt: skip
    p.add_argument("out_dir", help="Output folder; must not exist yet, or be empty.")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="Weight dtype of the exported policy (masks stay float32). Default: %(default)s.")
    p.add_argument("--lora", choices=("merged", "adapter"), default="merged",
                   help="LoRA checkpoints: merge the adapters into the base weights, or save the PEFT adapter "
                        "only. Default: %(default)s.")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse ``argv`` (default: the command line after ``export``), export, return the output folder."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return export_checkpoint(args.checkpoint, args.out_dir, dtype=args.dtype, lora=args.lora)
