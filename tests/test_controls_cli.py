"""Every shipped method wrapped by each token-choice control, by config alone: parses, and trains (docs/sparsity.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from sparsepo_lightning.cli import run as main
from sparsepo_lightning.masks import LearnedMasker, TokenMasker
from sparsepo_lightning.masks import controls as controls_module
from sparsepo_lightning.methods.rho1 import ExcessLossSelection
from sparsepo_lightning.objectives import SparsePO, WeightedDPO
from tests.distributed_run import frozen_options, make_data, make_module, make_trainer
from tests.test_methods_fit import MASKLESS, METHODS

ROOT = Path(__file__).resolve().parents[1]
CONTROLS = ("PermutedControl", "ResponseMeanControl", "BernoulliControl")


def wrapped(method: str, control: str) -> dict:
    """``configs/methods/<method>.yaml`` with its masker wrapped by ``control``."""
    config = yaml.safe_load((ROOT / "configs" / "methods" / f"{method}.yaml").read_text())
    config["model"]["masker"] = {"class_path": f"sparsepo_lightning.masks.controls.{control}",
                                 "init_args": {"masker": config["model"]["masker"], "seed": 1}}
    return config


def test_a_wrapped_method_runs_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "wrapped.yaml"
    path.write_text(yaml.safe_dump(wrapped("rho1", "PermutedControl")))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/hh/sparsepo_common.yaml", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["masker"]
    assert printed["class_path"].endswith("controls.PermutedControl")
    assert printed["init_args"]["masker"]["class_path"].endswith("rho1.ExcessLossSelection")


def test_every_method_wrapped_by_every_control_parses():
    """The type the CLI gives ``model.masker`` (``TokenMasker | None``), one parser for all wraps: every masker
    of configs/methods/*.yaml inside each control parses and is built with its own options."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--masker", type=TokenMasker | None)
    for method in (m for m in METHODS if m not in MASKLESS):
        for control in CONTROLS:
            config = wrapped(method, control)["model"]
            built = parser.instantiate_classes(parser.parse_object({"masker": config["masker"]})).masker
            assert type(built) is getattr(controls_module, control) and built.seed == 1
            inner = config["masker"]["init_args"]["masker"]
            assert type(built.masker).__name__ == inner["class_path"].rsplit(".", 1)[-1], (method, control)


@pytest.mark.parametrize("control", CONTROLS)
def test_each_control_trains_around_three_methods(control, tiny_model_dir, pairs_file, tmp_path):
    """Two optimizer steps each around a learned mask at a target sparsity, a selection from the step's statistics
    (Rho-1) and weights from two extra frozen models (TIS-DPO, whose frozen-model names the control passes on)."""
    wrap = getattr(controls_module, control)
    methods = {"sparse": {"objective": SparsePO(), "masker": wrap(LearnedMasker(target_sparsity=0.5))},
               "rho1": {"objective": WeightedDPO(beta=0.1), "masker": wrap(ExcessLossSelection())}}
    tisdpo = frozen_options(tiny_model_dir)
    methods["tisdpo"] = {**tisdpo, "masker": wrap(tisdpo["masker"])}
    for name, options in methods.items():
        module = make_module(tiny_model_dir, **options)
        trainer = make_trainer("auto", 1, tmp_path / name, max_steps=2, callbacks=[])
        trainer.fit(module, datamodule=make_data(tiny_model_dir, pairs_file, batch_size=2))
        assert trainer.global_step == 2 and module.masker.calls == 2, name
        assert torch.isfinite(trainer.callback_metrics["train/loss"]), name
