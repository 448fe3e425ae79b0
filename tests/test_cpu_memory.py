"""Keeping freed CPU memory in the process (``sparsepo_lightning/cpu_memory.py``): what it sets, when it does nothing,
its error, that ``sparsepo`` applies it, and that training is the same to the bit with and without it."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import pytest
import torch

from sparsepo_lightning import cpu_memory
from sparsepo_lightning.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


class _FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

        def mallopt(option: int, value: int) -> int:
            self.calls.append((option, value))
            return 1

        self.mallopt = mallopt


def test_keep_asks_glibc_for_no_mmap_and_no_trim(monkeypatch):
    libc = _FakeLibc()
    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(cpu_memory.sys, "platform", "linux")
    monkeypatch.delenv(cpu_memory.ENV, raising=False)
    assert cpu_memory.keep_freed_memory()
    assert libc.calls == [(-4, 0), (-1, -1)]  # M_MMAP_MAX = 0, M_TRIM_THRESHOLD = -1: never trim (malloc.h)


@pytest.mark.parametrize("setting", [{"env": "system"}, {"env": " System "}, {"platform": "darwin"}, {"libc": None}])
def test_system_another_platform_or_another_libc_change_nothing(setting, monkeypatch):
    libc = _FakeLibc()
    if setting.get("libc", libc) is None:
        del libc.mallopt  # a C library without mallopt (musl)
    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(cpu_memory.sys, "platform", setting.get("platform", "linux"))
    monkeypatch.setenv(cpu_memory.ENV, setting.get("env", "keep"))
    assert not cpu_memory.keep_freed_memory()
    assert getattr(libc, "calls", []) == []


def test_an_unknown_setting_is_a_config_error_naming_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(cpu_memory.ENV, "jemalloc")
    with pytest.raises(ConfigError, match=r"SPARSEPO_CPU_MEMORY='jemalloc': use 'keep' .* or 'system'"):
        cpu_memory.keep_freed_memory()


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "mallopt"),
                    reason="glibc's mallopt")
def test_the_real_mallopt_accepts_both_settings(cli_zygote):
    """In a process of its own (the settings stay for the process's life): glibc takes both values."""
    done = cli_zygote.python("from sparsepo_lightning.cpu_memory import keep_freed_memory\n"
                             "assert keep_freed_memory()\nprint('kept')")
    assert done.returncode == 0 and done.stdout.strip() == "kept", done.stderr[-2000:]


def test_sparsepo_applies_it_and_training_is_the_same_to_the_bit(cli_zygote, tiny_model_dir, tmp_path):
    """`sparsepo fit` on the tiny recipe, 4 steps, once keeping freed memory (the default) and once with glibc's
    defaults: the weights after the steps are equal to the bit; a bad value is one message, no traceback."""
    weights = {}
    for choice in ("keep", "system"):
        done = cli_zygote.run("fit", "--config", "configs/debug/tiny.yaml", "--model.model", tiny_model_dir,
                              "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "false",
                              "--trainer.logger.init_args.save_dir", str(tmp_path / choice),
                              env={"SPARSEPO_CPU_MEMORY": choice, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        (checkpoint,) = (tmp_path / choice).rglob("epoch=*-step=4.ckpt")
        weights[choice] = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert weights["keep"].keys() == weights["system"].keys()
    assert all(torch.equal(weights["keep"][k], weights["system"][k]) for k in weights["keep"])
    bad = cli_zygote.run("fit", "--config", "configs/debug/tiny.yaml", env={"SPARSEPO_CPU_MEMORY": "lots"})
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "SPARSEPO_CPU_MEMORY='lots'" in bad.stderr
