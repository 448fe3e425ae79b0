"""Shared test fixtures: tokenizers built locally (no hub access)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

_TOKENISED_CACHE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs ``-n auto``) the workers share the cores: each gets its share of torch
    threads instead of all of them (tests that start their own processes set their own thread counts).

    Tokenised data caches (``data.cache_tokenised``, on by default) go to a temporary folder of this process, removed
    at the end, never to the checkout's ``data/cache`` (processes that tests start inherit the variable)."""
    from sparsepo_lightning.data.token_cache import CACHE_ENV_VAR

    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))
    config.stash[_TOKENISED_CACHE] = os.environ[CACHE_ENV_VAR] = tempfile.mkdtemp(prefix="sparsepo-tokenised-")


def pytest_unconfigure(config: pytest.Config) -> None:
    if folder := config.stash.get(_TOKENISED_CACHE, None):
        shutil.rmtree(folder, ignore_errors=True)


_CORPUS = [
    "hello world",
    "hello there, how are you?",
    "The movie was great and the actors were wonderful.",
    "The movie was terrible; I left early.",
    "Summarize the post in one sentence.",
    "Write a function that adds two numbers.",
    "def add(a, b): return a + b",
]

ZEPHYR_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Zephyr-like chat template that writes BOS in text and ends each message with EOS."""


def _byte_bpe(special_tokens: list[str], vocab_size: int = 320) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) trained on a few sentences: encodes any unicode string, round-trips text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 20, trainer)
    return tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-like: byte-level BPE that prepends ``<s>``, eos ``</s>``, pad ``<pad>``, Zephyr chat template."""
    tokenizer = _byte_bpe(["<pad>", "<s>", "</s>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    wrapped.chat_template = ZEPHYR_TEMPLATE
    return wrapped


@pytest.fixture(scope="session")
def gpt2_style_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2-like: byte-level BPE, ``<|endoftext|>`` as bos = eos, no pad token, adds no BOS, no chat template."""
    tokenizer = _byte_bpe(["<|endoftext|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


DATA_FIXTURES = Path(__file__).parent / "fixtures" / "data"
"""Data files of the data-pipeline tests."""


def token_ids(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` without special tokens."""
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="session")
def no_eos_tokenizer():
    """WordLevel tokenizer without EOS whose normalizer deletes U+200B, so '\u200b' tokenises to nothing."""
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "a": 2, "b": 3}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Replace("\u200b", "")
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]")


WORDS = ["good", "bad", "great", "awful", "movie", "film", "the", "was", "really", "not", "fine", "plot"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> str:
    """A 2-layer Llama with the tiny tokenizer's vocabulary, saved as a normal HF checkpoint."""
    path = tmp_path_factory.mktemp("tiny-llama")
    from tests.tiny_models import tiny_llama

    model = tiny_llama(vocab=len(tiny_tokenizer))
    model.config.pad_token_id = tiny_tokenizer.pad_token_id
    model.config.bos_token_id = tiny_tokenizer.bos_token_id
    model.config.eos_token_id = tiny_tokenizer.eos_token_id
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> str:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(16):
        pick = lambda n: " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (n,), generator=g))  # noqa: E731
        rows.append({"prompt": f"review {i}: {pick(3)}", "chosen": pick(2 + i % 3), "rejected": pick(3 + i % 2)})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def ranks_by_mode(tiny_model_dir, pairs_file, tmp_path_factory, worker_id) -> dict[str, list[dict]]:
    """Launched once per test session: under ``pytest -n`` the first worker that needs it launches and the others
    wait on a lock and read what it saved (the launch is seeded and its inputs are the same in every worker)."""
    from filelock import FileLock

    from tests.distributed_launch import SHARED_MODES, launch_many, load_ranks

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if worker_id != "master" else base  # this session's folder, shared by its workers
    out, done = shared / "ranks_by_mode", shared / "ranks_by_mode.done"
    with FileLock(str(shared / "ranks_by_mode.lock")):
        if not done.exists():
            launch_many(SHARED_MODES, out, tiny_model_dir, pairs_file)
            done.touch()
    return load_ranks(out, SHARED_MODES)


@pytest.fixture(scope="session")
def cli_zygote():
    """A process that has imported the CLI; each ``sparsepo`` command a test runs is forked from it
    (``tests/cli_zygote.py``): a separate process without the interpreter's ~8 s start-up each time."""
    from tests.cli_zygote import CliZygote, cli_environment

    zygote = CliZygote(cli_environment())
    yield zygote
    zygote.close()
