"""Learned masks that cannot start dead (``init: ones``), the released start for contrast, the collapse warning, the
random control masker, and the run summary / mask dump that show what a run learned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch.testing import assert_close

from sparsepo_lightning.callbacks.summary import RunSummary, format_summary
from sparsepo_lightning.data import PreferenceDataModule
from sparsepo_lightning.masks import LearnedMasker, RandomMasker, UniformMasker
from sparsepo_lightning.module import PreferenceModule
from sparsepo_lightning.objectives import TDPO1, SparsePO
from sparsepo_lightning.study.maskdump import MaskDump, pair_from_record
from tests.test_masks import reference_outputs
from tests.tiny_models import random_rows, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


# ---- the start at 1 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("independent", [False, True])
def test_ones_start_gives_exactly_one_on_every_response_token_for_every_seed(independent):
    model = tiny_llama()
    ids, attention, _, mask = random_rows()
    for seed in range(12):
        torch.manual_seed(seed)
        masker = LearnedMasker(independent=independent, init="ones")
        masker.bind(model)
        masks = masker(reference_outputs(model, ids, attention, masker), mask)
        assert torch.equal(masks.reward, mask.float()) and torch.equal(masks.kl, mask.float())


def test_ones_start_is_tdpo1_at_step_zero_and_every_mask_parameter_gets_a_gradient(tiny_model_dir, pairs_file):
    seed_everything(0)
    learned = PreferenceModule(tiny_model_dir, objective=SparsePO(beta=0.5), masker=LearnedMasker(init="ones"))
    tdpo1 = PreferenceModule(tiny_model_dir, objective=TDPO1(beta=0.5))
    data = PreferenceDataModule(tokenizer=tiny_model_dir, train_file=pairs_file, batch_size=4, max_length=32,
                                max_prompt_length=16, val_split=None)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():  # perturb the policy so that the reward and KL terms are non-zero
        for p in learned.policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
        tdpo1.policy.load_state_dict(learned.policy.state_dict())
    loss = learned._shared_step(batch, "train")
    assert_close(loss, tdpo1._shared_step(batch, "train"), rtol=1e-6, atol=1e-7)
    loss.backward()
    net = learned.masker.reward_net
    for name in ("layer_weight", "layer_bias", "mixer_weight"):
        grad = getattr(net, name).grad
        assert grad is not None and grad.abs().sum() > 0, f"{name} receives no gradient at the start"


def test_unknown_init_names_the_option():
    with pytest.raises(ValueError, match="model.masker.init_args.init"):
        LearnedMasker(init="zeros")


@pytest.fixture(scope="module")
def smollm2_states():
    """Reference states of SmolLM2-135M on the quickstart's validation texts (the real model, converted offline)."""
    from sparsepo_lightning.model_sources import load_causal_lm, load_tokenizer

    model = load_causal_lm("smollm2-135m").eval()
    tokenizer = load_tokenizer("smollm2-135m")
    rows = [json.loads(line) for line in (ROOT / "data/quickstart/val.jsonl").read_text().splitlines()][:24]
    texts = [r["prompt"] + r["chosen"] for r in rows]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    mask = encoded["attention_mask"][:, 1:].bool()
    probe = LearnedMasker()
    with torch.no_grad():
        outputs = reference_outputs(model, encoded["input_ids"], encoded["attention_mask"], probe)
    return model, outputs, mask


def test_on_smollm2_the_ones_start_is_alive_at_nominal_beta_and_the_released_start_is_not(smollm2_states):
    model, outputs, mask = smollm2_states
    released_means = []
    for seed in range(10):
        torch.manual_seed(seed)
        ones = LearnedMasker(init="ones")
        ones.bind(model)
        masks = ones(outputs, mask)
        # 1 up to the float32 rounding of sum_l 1/L (L = 30 layers)
        assert_close(masks.reward, mask.float(), rtol=0, atol=1e-6, msg=f"seed {seed}: the start is not 1")
        torch.manual_seed(seed)
        released = LearnedMasker(init="released")
        released.bind(model)
        values = released(outputs, mask).reward[mask]
        released_means.append(values.mean().item())
    # the released start scales beta down by more than 10x on every seed (and often to nothing)
    assert max(released_means) < 0.1, released_means


# ---- the collapse warning ----------------------------------------------------------------------------------
def test_collapse_warning_fires_within_the_first_steps_on_a_dead_learned_mask(tiny_model_dir, pairs_file, tmp_path):
    seed_everything(0)
    module = PreferenceModule(tiny_model_dir, masker=LearnedMasker(init="released"), lr=1e-3)
    with torch.no_grad():
        module.masker.reward_net.layer_bias.fill_(-10.0)  # every per-layer ReLU is off: a dead mask
    data = PreferenceDataModule(tokenizer=tiny_model_dir, train_file=pairs_file, batch_size=2, max_length=32,
                                max_prompt_length=16, val_split=None)
    trainer = Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"mask collapse: .*for 3 training batches in a row.*init: ones") as record:
        trainer.fit(module, datamodule=data)
    message = next(str(w.message) for w in record if "mask collapse" in str(w.message))
    assert "global step 3" in message and "mean mask 0.0000" in message


def test_no_collapse_warning_for_a_live_mask(tiny_model_dir, pairs_file, tmp_path, recwarn):
    seed_everything(0)
    module = PreferenceModule(tiny_model_dir, masker=LearnedMasker(init="ones"), lr=1e-3)
    data = PreferenceDataModule(tokenizer=tiny_model_dir, train_file=pairs_file, batch_size=2, max_length=32,
                                max_prompt_length=16, val_split=None)
    Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0).fit(module, datamodule=data)
    assert not [w for w in recwarn if "mask collapse" in str(w.message)]


# ---- the random control ------------------------------------------------------------------------------------
def test_random_masker_keep_rate_value_and_response_only():
    mask = torch.zeros(64, 400, dtype=torch.bool)
    mask[:, 50:350] = True
    masks = RandomMasker(keep_rate=0.3, value=2.5, seed=7)(None, mask)
    kept = masks.reward[mask] > 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert set(masks.reward[mask].unique().tolist()) == {0.0, 2.5}
    assert (masks.reward[~mask] == 0).all() and masks.kl is masks.reward and masks.common and not masks.learned


def test_random_masker_matches_a_naive_per_call_draw_and_resumes_exactly():
    _, _, _, mask = random_rows()
    masker = RandomMasker(keep_rate=0.5, seed=3)
    first, second = masker(None, mask).reward, masker(None, mask).reward
    for call, got in enumerate((first, second)):
        uniform = torch.rand(mask.shape, generator=torch.Generator().manual_seed(3 + 2 * call * 1_000_003))
        assert torch.equal(got, ((uniform < 0.5) & mask).float())
    assert not torch.equal(first, second)
    resumed = RandomMasker(keep_rate=0.5, seed=3)
    resumed.load_state_dict(RandomMasker(keep_rate=0.5, seed=3).state_dict())  # a fresh state: call 0
    assert torch.equal(resumed(None, mask).reward, first)
    saved = masker.state_dict()
    third = masker(None, mask).reward
    resumed.load_state_dict(saved)
    assert torch.equal(resumed(None, mask).reward, third)


def test_random_masker_independent_draws_and_option_checks():
    _, _, _, mask = random_rows()
    masks = RandomMasker(keep_rate=0.5, independent=True)(None, mask)
    assert not masks.common and not torch.equal(masks.reward, masks.kl)
    with pytest.raises(ValueError, match="keep_rate"):
        RandomMasker(keep_rate=0.0)
    with pytest.raises(ValueError, match="value"):
        RandomMasker(keep_rate=0.5, value=0.0)
    assert torch.equal(RandomMasker(keep_rate=1.0)(None, mask).reward, UniformMasker()(None, mask).reward)


# ---- what a run shows at its end ---------------------------------------------------------------------------
def test_run_summary_and_mask_dump_record_a_real_fit(tiny_model_dir, pairs_file, tmp_path, capsys):
    from lightning.pytorch.loggers import CSVLogger

    seed_everything(0)
    module = PreferenceModule(tiny_model_dir, masker=LearnedMasker(init="ones"), lr=1e-3, mask_lr=1e-2)
    data = PreferenceDataModule(tokenizer=tiny_model_dir, train_file=pairs_file, val_file=pairs_file, batch_size=4,
                                max_length=32, max_prompt_length=16)
    dump = tmp_path / "masks.json"
    trainer = Trainer(accelerator="cpu", max_steps=4, val_check_interval=2, logger=CSVLogger(tmp_path),
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[MaskDump(str(dump))])
    trainer.fit(module, datamodule=data)
    summary = json.loads((Path(trainer.logger.log_dir) / "summary.json").read_text())
    assert [v["step"] for v in summary["validations"]] == [2, 4]
    assert summary["initial_masks"]["mask_mean"] == 1.0 and summary["initial_masks"]["mask_sparsity_chosen"] == 0.0
    assert set(summary["validations"][0]) >= {"loss", "accuracy", "margin", "mask_mean", "mask_sparsity_chosen"}
    diagnostics = summary["validations"][-1]["diagnostics"]  # exact over the whole validation (masks.diagnostics)
    assert {f"{name}_{mask}_{side}" for name in ("mean_kept", "gini", "effective_token_ratio", "within_cv",
                                                   "between_variance_share")
            for mask in ("reward", "kl") for side in ("chosen", "rejected")} == set(diagnostics)
    assert diagnostics["gini_kl_chosen"] == diagnostics["gini_reward_chosen"]  # a common mask
    text = format_summary(summary)
    assert "validation at step" in text and "masks at the start" in text and "from step 2 to 4" in text
    assert "reward mask at step 4: mean kept weight" in text
    saved = json.loads(dump.read_text())
    assert saved["global_step"] == 4 and saved["common"] and len(saved["pairs"]) == 16
    pair = pair_from_record(saved["pairs"][0])
    assert len(pair.chosen.tokens) == len(pair.chosen.reward) > 0


def test_run_summary_records_a_whole_sanity_validation_as_step_zero(tiny_model_dir, pairs_file, tmp_path):
    seed_everything(0)
    module = PreferenceModule(tiny_model_dir, masker=LearnedMasker(init="ones"), lr=1e-3)
    data = PreferenceDataModule(tokenizer=tiny_model_dir, train_file=pairs_file, val_file=pairs_file, batch_size=4,
                                max_length=32, max_prompt_length=16)
    trainer = Trainer(accelerator="cpu", max_steps=2, val_check_interval=2, num_sanity_val_steps=-1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    summary = next(c for c in trainer.callbacks if isinstance(c, RunSummary))  # the module adds it to every run
    before = summary.validations[0]
    assert [v["step"] for v in summary.validations] == [0, 2]
    # the policy is the reference: every reward is 0, the loss log 2, and the start-at-1 masks are exactly 1
    assert before["loss"] == pytest.approx(0.6931472, abs=1e-6) and before["margin"] == 0.0
    assert before["accuracy"] == 0.0 and before["mask_mean"] == pytest.approx(1.0, abs=1e-6)
    assert "step 0 is before training" in format_summary(summary.summary(trainer))


def test_run_summary_is_part_of_every_run(tiny_model_dir):
    callbacks = PreferenceModule(tiny_model_dir).configure_callbacks()
    assert any(isinstance(c, RunSummary) for c in callbacks)
