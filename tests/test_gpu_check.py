"""``make gpu-check`` (``benchmarks/gpu_check.py``) where no GPU is: its argument handling, its plan, its no-CUDA
exit, and one of its training-step checks run on the CPU with the tiny model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_so_and_exits_0(gpu_check, monkeypatch, capsys, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "check.json")]) == 0
    assert "no CUDA device on this machine; nothing to check" in capsys.readouterr().out
    assert not (tmp_path / "check.json").exists()


def test_the_plan_fits_the_budget_and_names_every_check(gpu_check, capsys, tmp_path):
    assert sum(gpu_check.LIMITS.values()) <= 480 and set(gpu_check.LIMITS) == set(gpu_check.CHECKS)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "check.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ")[0] for line in lines] == list(gpu_check.CHECKS)
    assert "-m pytest -q -m gpu" in lines[0]
    assert "--step fsdp2_bf16 --model smollm2-135m --accelerator cuda" in lines[1]
    side = lines[4]
    assert "bench_dpo.py --layers 30 --lengths 2048 --pairs 4" in side and "trl,floor,dpo" in side
    assert side.endswith(str(tmp_path / "gpu_side_by_side.json"))


@pytest.mark.parametrize("argv, message", [(["--checks", "cuda_tests,warp"], "--checks: unknown warp; choose from"),
                                           (["--budget", "0"], "--budget=0.0: must be > 0 seconds")])
def test_bad_arguments_name_the_option(gpu_check, argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        gpu_check.parse_args(argv)
    assert error.value.code == 2 and message in capsys.readouterr().err


def test_a_check_that_fails_or_runs_out_of_time_is_reported(gpu_check, monkeypatch, tmp_path):
    args = gpu_check.parse_args(["--out", str(tmp_path / "check.json")])
    monkeypatch.setattr(gpu_check, "command", lambda check, args: ["python", "-c", "import sys; print('boom'); "
                                                                   "sys.exit(3)" if check == "packed_sdpa" else
                                                                   "import time; time.sleep(5)"])
    failed = gpu_check.run_check("packed_sdpa", args, limit=30)
    assert failed["ok"] is False and failed["detail"] == "boom"
    slow = gpu_check.run_check("packed_flex", args, limit=0.5)
    assert slow["ok"] is False and slow["detail"].startswith("timeout after")


def test_packed_sdpa_training_step_runs_on_cpu(gpu_check, tiny_model_dir):
    """The check's own code path (module, data module, trainer) on the CPU with the tiny model: one finite step."""
    result = gpu_check.training_step("packed_sdpa", tiny_model_dir, "cpu")
    assert result["check"] == "packed_sdpa" and result["peak_mib"] is None
    assert result["loss"] == pytest.approx(0.6931, abs=1e-3)  # the first DPO step: policy = reference, log 2
