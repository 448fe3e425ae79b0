"""The quickstart learns visibly, and the README quotes exactly the recorded run (benchmarks/results/quickstart.json,
written by benchmarks/quickstart.py)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sparsepo_lightning.callbacks.summary import format_summary

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "quickstart.json"


def _recorded() -> dict:
    return json.loads(RESULT.read_text())


def _script():
    spec = importlib.util.spec_from_file_location("quickstart_script", ROOT / "benchmarks" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_quotes_the_recorded_quickstart_summary():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```text\n(Run summary:.*?)```", readme, flags=re.S)
    assert len(blocks) == 1, "the README shows the quickstart's run summary once, in a ```text block"
    assert blocks[0].strip() == format_summary(_recorded()).strip()


def test_recorded_quickstart_shows_learning():
    _check_learning(_recorded())


def _check_learning(summary: dict) -> None:
    rows, start = summary["validations"], summary["initial_masks"]
    before, trained = rows[0], [row for row in rows if row["step"] > 0]
    assert before["step"] == 0 and before["loss"] == pytest.approx(0.693147, abs=1e-5) and before["margin"] == 0.0
    first, last = trained[0], trained[-1]
    assert last["accuracy"] >= 0.65, "validation accuracy is not clearly above chance"
    assert last["accuracy"] >= first["accuracy"] and last["margin"] > first["margin"] > 0, "no further learning"
    assert last["loss"] < first["loss"] < before["loss"]
    assert start["mask_mean"] == pytest.approx(1.0, abs=1e-5) and start["mask_sparsity_chosen"] == 0.0
    assert abs(last["mask_mean"] - start["mask_mean"]) > 0.01 or last["mask_sparsity_chosen"] > 0, \
        "the masks did not move from their start"


@pytest.mark.slow
def test_the_real_quickstart_reproduces_the_recorded_first_quarter(tmp_path):
    """`make quickstart` itself (SmolLM2-135M, the shipped pairs, the shipped config, the same learning-rate
    schedule) up to its first validation during training, step 16 of 64: the step-0 and step-16 rows must be the
    recorded ones (up to floating-point differences between CPUs), so the run learns in the recorded direction.
    The rest of the recorded run (steps 32-64) is held by ``test_recorded_quickstart_shows_learning``."""
    pytest.importorskip("gguf")
    script = _script()
    summary = script.run_quickstart(tmp_path, script.STOP_AT_FIRST_VALIDATION)
    recorded = _recorded()
    assert [v["step"] for v in summary["validations"]] == [0, 16]
    assert summary["initial_masks"]["mask_mean"] == pytest.approx(1.0, abs=1e-5)
    for got, want in zip(summary["validations"], recorded["validations"][:2], strict=True):
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=0.05)
        assert got["margin"] == pytest.approx(want["margin"], rel=0.1, abs=1e-6)
        assert got["loss"] == pytest.approx(want["loss"], rel=0.05)
        assert got["mask_mean"] == pytest.approx(want["mask_mean"], rel=0.05)
    log_dir = next(tmp_path.glob("quickstart/version_*"))  # TensorBoard logs of the real model's run
    tags = set(EventAccumulator(str(log_dir)).Reload().Tags()["scalars"])
    assert {"train/loss", "val/loss", "train/masks/sparsity_reward_chosen", "val/masks/mean_reward"} <= tags
    first = summary["validations"][1]
    assert first["accuracy"] >= 0.65 and first["margin"] > 0.5 and first["loss"] < 0.6931 - 0.1
    assert abs(first["mask_mean"] - 1.0) > 0.01, "the masks did not move from their start"


def test_readme_quotes_the_recorded_quickstart_time():
    readme = (ROOT / "README.md").read_text()
    assert f"on 2 CPU cores in {round(_recorded()['wall_seconds'])} s" in readme
