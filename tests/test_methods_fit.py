"""Every method config composes with a recipe as a second --config and trains through `sparsepo fit`; its masks
show up in the mask statistics and the heat-maps; extra frozen models stay frozen and out of checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparsepo_lightning.cli import run as main
from sparsepo_lightning.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted(p.stem for p in (ROOT / "configs" / "methods").glob("*.yaml"))
MASKLESS = ("bco", "dpo", "aligndistil", "treg")  # objectives without token masks (test_bco_fit.py trains bco.yaml,
# test_full_distribution_methods.py aligndistil.yaml, test_treg.py treg.yaml)
FROZEN = {"tisdpo": ("positive", "negative"), "cdpo": ("positive", "negative"),
          "sepo": ("oracle", "oracle_reference"), "tgdpo": ("reward",), "aligndistil": ("dpo", "reverse_dpo")}
@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tiny_tokenizer) -> str:
    """A second tiny Llama (other weights, same tokenizer): the extra frozen models must differ from the policy."""
    from tests.tiny_models import tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama-other")
    model = tiny_llama(seed=7, vocab=len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def _fit(method: str, model_dir: str, other_dir: str, pairs: str, tmp_path: Path, *extra: str):
    frozen = FROZEN.get(method, ())
    models = ["--model.frozen_models", "{" + ", ".join(f"{n}: {other_dir if i == 0 else model_dir}"
                                                       for i, n in enumerate(frozen)) + "}"] if frozen else []
    return main(["fit", "--config", "configs/debug/tiny.yaml", "--config", f"configs/methods/{method}.yaml",
                 "--model.model", model_dir, *models, "--data.train_file", pairs, "--data.val_file", pairs,
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.max_steps", "2",
                 "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                 "--trainer.enable_progress_bar", "false", *extra])


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("spans", *MASKLESS)])
def test_method_config_trains_the_tiny_recipe(method, tiny_model_dir, other_model_dir, pairs_file, tmp_path,
                                              monkeypatch):
    """Trains 2 steps; its masks reach the mask statistics and the heat-maps; `sparsepo evaluate`'s loader rebuilds
    the trained policy from its checkpoint (frozen models or not)."""
    from sparsepo_lightning.evaluate.policies import load_policy

    monkeypatch.chdir(ROOT)
    cli = _fit(method, tiny_model_dir, other_model_dir, pairs_file, tmp_path,
               "--trainer.callbacks+=sparsepo_lightning.callbacks.TokenHeatmaps", "--trainer.callbacks.num_pairs", "1")
    module = cli.model
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert {"train/masks/mean_reward", "train/masks/sparsity_reward_chosen", "val/masks/mean_reward"} <= set(metrics)
    log_dir = Path(cli.trainer.logger.log_dir)
    assert "Token masks at step" in next((log_dir / "heatmaps").glob("step_*.html")).read_text()
    loaded = load_policy(str(next((log_dir / "checkpoints").glob("*.ckpt"))))
    for name, value in module.policy.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    if method in FROZEN:
        assert sorted(module.frozen_models) == sorted(FROZEN[method])
        for model in module.frozen_models.values():
            assert not model.training and not any(p.requires_grad for p in model.parameters())
        ckpt = next((Path(cli.trainer.logger.log_dir) / "checkpoints").glob("*.ckpt"))
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        assert not any(k.startswith("frozen_models.") for k in saved), "frozen models must not be checkpointed"
        assert any(k.startswith("policy.") for k in saved)


def test_frozen_models_reload_from_their_source_on_resume(tiny_model_dir, other_model_dir, pairs_file, tmp_path,
                                                          monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = _fit("tisdpo", tiny_model_dir, other_model_dir, pairs_file, tmp_path)
    ckpt = next((Path(cli.trainer.logger.log_dir) / "checkpoints").glob("*.ckpt"))
    again = _fit("tisdpo", tiny_model_dir, other_model_dir, pairs_file, tmp_path / "resumed",
                 "--trainer.max_steps", "3", "--ckpt_path", str(ckpt))
    assert again.trainer.global_step == 3
    first = dict(cli.model.frozen_models["positive"].named_parameters())
    for name, value in again.model.frozen_models["positive"].named_parameters():
        assert torch.equal(value, first[name])


def test_plugin_masks_reach_the_heatmaps(tiny_model_dir, other_model_dir, pairs_file, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = _fit("rho1", tiny_model_dir, other_model_dir, pairs_file, tmp_path, "--trainer.callbacks+=sparsepo_lightning"
               ".callbacks.TokenHeatmaps", "--trainer.callbacks.num_pairs", "2")
    pages = list((Path(cli.trainer.logger.log_dir) / "heatmaps").glob("step_*.html"))
    assert pages and "Token masks at step" in pages[0].read_text()


def test_a_missing_or_unused_frozen_model_is_a_config_error(tiny_model_dir, other_model_dir, tmp_path):
    from sparsepo_lightning.methods.tisdpo import ContrastiveImportance
    from sparsepo_lightning.module import PreferenceModule
    from sparsepo_lightning.objectives import DPO, WeightedDPO

    with pytest.raises(ConfigError, match=r"negative.*Fix: model.frozen_models"):
        PreferenceModule(tiny_model_dir, WeightedDPO(), ContrastiveImportance(),
                         frozen_models={"positive": tiny_model_dir})
    with pytest.raises(ConfigError, match="no part of the run reads"):
        PreferenceModule(tiny_model_dir, DPO(), frozen_models={"extra": other_model_dir})


def test_a_masker_reading_the_reference_refuses_a_reference_free_objective(tiny_model_dir):
    from sparsepo_lightning.methods.rho1 import ExcessLossSelection
    from sparsepo_lightning.module import PreferenceModule
    from sparsepo_lightning.objectives import MaskedSimPO

    with pytest.raises(ConfigError, match="reference-free"):
        PreferenceModule(tiny_model_dir, MaskedSimPO(), ExcessLossSelection())


SPANS = ROOT / "data" / "samples" / "spans"


def test_span_weights_from_the_shipped_span_data_train_and_match_the_columns(tmp_path, monkeypatch):
    """configs/methods/spans.yaml on the shipped span sample (SmolLM2 tokenizer, tiny random Llama): the token
    weights the loss uses are the spans' weights on covered tokens and 0 elsewhere."""
    pytest.importorskip("gguf")
    monkeypatch.chdir(ROOT)
    cli = main(["fit", "--config", "configs/debug/tiny.yaml", "--config", "configs/methods/spans.yaml",
                "--data.train_file", str(SPANS / "train.jsonl"), "--data.val_file", str(SPANS / "val.jsonl"),
                "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.max_steps", "2",
                "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.global_step == 2
    record = cli.model.last_step
    weights, covered = record.batch.shifted_token_weights()
    assert weights is not None and covered.any()
    expected = torch.where(covered, weights, torch.zeros_like(weights)) * record.stats.response_mask
    assert torch.equal(record.masks.reward, expected)
    assert 0 < float(cli.trainer.callback_metrics["train/masks/mean_reward"]) < 1


def test_span_weights_without_span_columns_is_a_clear_error(tiny_model_dir, other_model_dir, pairs_file, tmp_path,
                                                            monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="chosen_spans/rejected_spans"):
        _fit("spans", tiny_model_dir, other_model_dir, pairs_file, tmp_path)


def test_the_span_sample_is_what_its_script_writes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_spans", SPANS / "make_spans.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import json

    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    lexicon = SentimentIntensityAnalyzer().lexicon
    for line in (SPANS / "val.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["chosen_spans"] == module.spans(row["chosen"], lexicon)
        assert row["rejected_spans"] == module.spans(row["rejected"], lexicon)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dpo"])
def test_method_config_composes_with_the_sentiment_quickstart(method, tmp_path, monkeypatch):
    """Each method file on top of the quickstart recipe (its data module and options), one optimizer step.
    The composition is the point, so every model is the tiny random Llama with SmolLM2's tokenizer: the real
    135M model spent 5-12 s per method here, and its training step is the quickstart test's."""
    pytest.importorskip("gguf")
    monkeypatch.chdir(ROOT)
    data = ["--data.train_file", str(SPANS / "train.jsonl"), "--data.val_file", str(SPANS / "val.jsonl")]
    frozen = ["--model.frozen_models", "{" + ", ".join(f"{n}: tiny-random-llama" for n in FROZEN.get(method, ())) + "}"]
    cli = main(["fit", "--config", "configs/quickstart.yaml", "--config", f"configs/methods/{method}.yaml",
                "--model.model", "tiny-random-llama",
                *(data if method == "spans" else []), *(frozen if method in FROZEN else []),
                "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
                "--data.init_args.batch_size", "2",  # 2 pairs: the composition is the point, not the batch
                "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
                "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    if method == "aligndistil":  # no masks; the scaled divergence to the teacher is logged
        assert torch.isfinite(cli.trainer.callback_metrics["train/aligndistil/scaled_kl"])
    elif method == "treg":  # no masks; the token rewards from the contrastive prompt variants are logged
        assert torch.isfinite(cli.trainer.callback_metrics["train/treg/token_reward_chosen"])
    elif method in MASKLESS:  # BCO: no masks; its reward shift is logged
        assert "train/rewards/delta" in cli.trainer.callback_metrics
    else:
        assert "train/masks/mean_reward" in cli.trainer.callback_metrics
