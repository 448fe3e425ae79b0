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
    recorded = _recorded()
    assert len(recorded["train_loss"]) == recorded["global_step"], "one training loss per step"


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
def test_the_real_quickstart_reproduces_the_recorded_first_steps(tmp_path):
    """`make quickstart` itself (SmolLM2-135M, the shipped pairs, the shipped config, the same learning-rate
    schedule) for its first steps: each step's training loss must be the recorded one (up to floating-point
    differences between CPUs), so the run follows the recorded trajectory, and the loss must already fall once the
    warm-up has left zero. The rest of the recorded run is held by ``test_recorded_quickstart_shows_learning``."""
    pytest.importorskip("gguf")
    script = _script()
    summary = script.run_quickstart(tmp_path, script.STOP_AFTER_FIRST_STEPS)
    recorded = _recorded()
    steps = script.FIRST_STEPS
    assert summary["global_step"] == steps and len(summary["train_loss"]) == steps
    assert summary["train_loss"] == pytest.approx(recorded["train_loss"][:steps], rel=1e-3)
    assert summary["initial_masks"] == pytest.approx(recorded["initial_masks"], abs=1e-5)
    assert summary["train_loss"][0] == pytest.approx(0.693147, abs=1e-5)  # step 0: policy = reference
    assert summary["train_loss"][-1] < summary["train_loss"][0] - 0.01, "the loss did not fall in the first steps"
    log_dir = next(tmp_path.glob("quickstart/version_*"))  # TensorBoard logs of the real model's run
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    for tag in ("train_step/masks/sparsity_reward_chosen", "train_step/rewards/margin", "train_step/loss"):
        assert [e.step for e in events.Scalars(tag)] == list(range(steps)), tag  # every optimizer step
    assert {"val_epoch/loss", "val_epoch/masks/mean_reward", "lr-AdamW/policy"} <= set(events.Tags()["scalars"])
    assert events.Tensors("custom_scalars__config__"), "no custom-scalars layout"  # charts: test_run_identity.py
    assert abs(summary["validations"][0]["mask_mean"] - 1.0) > 0.01, "the masks did not move from their start"


def test_readme_quotes_the_recorded_quickstart_time():
    readme = (ROOT / "README.md").read_text()
    assert f"on 2 CPU cores in {round(_recorded()['wall_seconds'])} s" in readme
