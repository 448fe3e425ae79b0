"""Callbacks: statistics against hand-made masks (also under gradient accumulation and 2-process DDP), dead units,
heat-map rendering, generation samples, and the callback presets through the CLI with TensorBoard tags."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import seed_everything
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn

from sparsepo_lightning.callbacks import GenerationSamples, WeightedStats
from sparsepo_lightning.callbacks.heatmaps import pairs_from_record, render_html, render_pair
from sparsepo_lightning.callbacks.statistics import Stats, UnitActivity, dead_fractions, mask_stats
from sparsepo_lightning.cli import run as main
from sparsepo_lightning.masks.learned import MaskNetwork
from sparsepo_lightning.module import PreferenceModule
from sparsepo_lightning.objectives import SparsePO
from sparsepo_lightning.types import LossOutput, PreferenceBatch, StepRecord, TokenMasks, TokenStats
from tests.callbacks_run import first_pairs, first_step_statistics

ROOT = Path(__file__).resolve().parents[1]


# ---- hand-made masks ------------------------------------------------------------------------------------------
def test_mask_stats_on_hand_made_masks():
    """B = 2 pairs, 4 columns. Rows (chosen 0, chosen 1, rejected 0, rejected 1), response columns marked R:

    row 0: R R R .   mask 0   0.5 1   9      -> 1 zero of 3 -> 33.3 %, L1 1.5
    row 1: . R R R   mask 7   0   0   2      -> 2 zeros of 3 -> 66.7 %, L1 2
    row 2: R R . .   mask 1   1   0   0      -> 0 %, L1 2
    row 3: R R R R   mask 0   0   0   0      -> 100 %, L1 0
    chosen sparsity (33.3 + 66.7) / 2 = 50, rejected (0 + 100) / 2 = 50; L1 chosen 1.75, rejected 1;
    max over response tokens = 2 (the 9 and 7 are outside the response).
    """
    resp = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    reward = torch.tensor([[0, 0.5, 1, 9], [7, 0, 0, 2], [1, 1, 0, 0], [0, 0, 0, 0]])
    stats = mask_stats(TokenMasks(reward=reward, kl=reward, common=True), resp, histograms=True)
    metric = WeightedStats()
    metric.update(stats)
    out = metric.compute()
    torch.testing.assert_close(out["masks/sparsity_reward_chosen"], torch.tensor(50.0))
    torch.testing.assert_close(out["masks/sparsity_reward_rejected"], torch.tensor(50.0))
    torch.testing.assert_close(out["masks/l1_reward_chosen"], torch.tensor(1.75))
    torch.testing.assert_close(out["masks/l1_reward_rejected"], torch.tensor(1.0))
    torch.testing.assert_close(out["masks/max_reward"], torch.tensor(2.0))
    torch.testing.assert_close(out["masks/sparsity_kl_chosen"], torch.tensor(50.0))  # common: same mask
    assert sorted(out["masks/reward_chosen"].tolist()) == [0, 0, 0, 0.5, 1, 2]  # 6 chosen response tokens
    assert "masks/kl_chosen" not in out, "common masks: the KL histogram would duplicate the reward one"


def test_window_over_micro_batches_equals_the_concatenated_batch():
    """Sparsity is per response then averaged over responses, so two micro-batches of 1 pair each must give the
    value of one batch of 2 pairs (not the mean of two per-batch means weighted equally by tokens)."""
    resp = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    mask = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 3, 0, 1]], dtype=torch.float)
    whole = WeightedStats()
    whole.update(mask_stats(TokenMasks(mask, mask), resp))
    window = WeightedStats()
    for pair in (0, 1):  # rows (pair, 2 + pair) -> a batch of one pair
        rows = [pair, 2 + pair]
        window.update(mask_stats(TokenMasks(mask[rows], mask[rows]), resp[rows]))
    for name, value in whole.compute().items():
        torch.testing.assert_close(window.compute()[name], value, msg=name)


def test_dead_units_from_forward_hooks_over_a_window():
    """LN of h = (a, −a, a, −a) is (1, −1, 1, −1) (up to eps), so with w_0 = 0, b_0 = −0.5 unit 0 always has
    pre-activation −0.5 (dead), and with w_1 = (1, 0, 0, 0), b_1 = 0 unit 1 has pre-activation sign(a).
    Micro-batch 1 (a < 0 on both tokens): both dead -> 1.0. Micro-batch 2 (one token a > 0): unit 1 alive -> 0.5.
    The window of both: unit 1 fired once -> 0.5."""
    net = MaskNetwork(num_layers=2, hidden_size=4)
    with torch.no_grad():
        net.layer_weight.copy_(torch.tensor([[0.0, 0, 0, 0], [1, 0, 0, 0]]))
        net.layer_bias.copy_(torch.tensor([-0.5, 0.0]))
    masker = nn.Module()
    masker.reward_net = net
    units = UnitActivity(masker)

    def states(signs: list[float]) -> Tensor:  # (n, L=2, d=4)
        return torch.stack([torch.tensor([s, -s, s, -s]).expand(2, 4) for s in signs])

    net(states([-1.0, -2.0]))
    first = units.pop()
    assert dead_fractions(first) == {"masks/dead_units_reward": torch.tensor(1.0)}
    net(states([-1.0, 3.0]))
    second = units.pop()
    assert dead_fractions(second)["masks/dead_units_reward"] == 0.5
    window = WeightedStats()
    window.update(Stats(maxima=first))
    window.update(Stats(maxima=second))
    assert dead_fractions(window.compute())["masks/dead_units_reward"] == 0.5
    units.remove()
    net(states([1.0]))
    assert units.pop() == {}


# ---- fits: accumulation and DDP equal one batch ---------------------------------------------------------------
def expected_from_batch(batch: PreferenceBatch) -> dict[str, float]:
    """The statistics of one batch, by explicit loops over responses and tokens (independent of the callback)."""
    _, resp = batch.shifted_labels()
    pairs = batch.num_pairs
    out: dict[str, list[float]] = {"chosen_sparsity": [], "rejected_sparsity": [], "chosen_l1": [], "rejected_l1": []}
    top = 0.0
    for row in range(2 * pairs):
        side = "chosen" if row < pairs else "rejected"
        values = [(int(batch.input_ids[row, t]) % 3) / 2 for t in range(resp.shape[1]) if resp[row, t]]
        out[f"{side}_sparsity"].append(100.0 * sum(v == 0 for v in values) / len(values))
        out[f"{side}_l1"].append(sum(values))
        top = max([top, *values])
    return {"train_step/masks/sparsity_reward_chosen": sum(out["chosen_sparsity"]) / pairs,
            "train_step/masks/sparsity_reward_rejected": sum(out["rejected_sparsity"]) / pairs,
            "train_step/masks/l1_reward_chosen": sum(out["chosen_l1"]) / pairs,
            "train_step/masks/l1_kl_rejected": sum(out["rejected_l1"]) / pairs,
            "train_step/masks/max_reward": top, "train_step/masks/dead_units_reward": 0.5}


@pytest.fixture(scope="module")
def features(tiny_model_dir, pairs_file):
    return first_pairs(tiny_model_dir, pairs_file)


@pytest.fixture(scope="module")
def one_batch(tiny_model_dir, pairs_file, tmp_path_factory) -> dict[str, float]:
    """First optimizer step of one process with all 4 pairs in one batch."""
    return first_step_statistics(tiny_model_dir, pairs_file, 4, tmp_path_factory.mktemp("one"))


def _assert_same(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(want) <= set(got), f"missing {sorted(set(want) - set(got))}"
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_one_batch_statistics_match_hand_computed_masks(one_batch, features):
    rows, collate = features
    _assert_same(one_batch, expected_from_batch(collate(rows)))
    for name in ("train_step/rewards/margin", "train_step/rewards/accuracy", "train_step/kl/token_chosen",
                 "train_step/kl/seq_rejected", "train_step/kl/masked_chosen", "train_step/loss",
                 "train_step/logps/chosen"):
        assert name in one_batch


def test_one_batch_mask_diagnostics_match_mask_diagnostics_of_each_half(one_batch, features):
    """The callback's window diagnostics (also compared under accumulation and DDP below, with every other value)
    equal ``mask_diagnostics`` of the hand-made masks of the chosen and the rejected responses."""
    from sparsepo_lightning.masks.diagnostics import LOGGED, mask_diagnostics

    batch = features[1](features[0])
    _, resp = batch.shifted_labels()
    masks = (batch.input_ids[:, :-1] % 3).float() / 2 * resp
    pairs = batch.num_pairs
    for side, rows in (("chosen", slice(0, pairs)), ("rejected", slice(pairs, None))):
        want = mask_diagnostics(masks[rows], resp[rows])
        for name in LOGGED:
            for mask in ("reward", "kl"):
                got = one_batch[f"train_step/masks/{name}_{mask}_{side}"]
                assert got == pytest.approx(want[name].item(), rel=1e-5, abs=1e-6), (name, mask, side)
    assert not any("/_m" in name for name in one_batch)  # the moments stay internal


def test_gradient_accumulation_equals_one_batch(one_batch, tiny_model_dir, pairs_file, tmp_path):
    accumulated = first_step_statistics(tiny_model_dir, pairs_file, 2, tmp_path, accumulate_grad_batches=2)
    _assert_same(accumulated, one_batch)


def test_two_process_ddp_equals_one_process(one_batch, ranks_by_mode):
    """DistributedSampler(shuffle=False) gives rank 0 pairs {0, 2} and rank 1 pairs {1, 3}: together the batch of
    the single-process run, so every statistic (means over responses, token-weighted KL, max) must match.
    ``tests/callbacks_run.py`` runs on 2 gloo ranks as the ``ddp_statistics`` mode of ``tests/distributed_run.py``."""
    _assert_same(ranks_by_mode["ddp_statistics"][0]["values"], one_batch)


# ---- heat-maps and samples ------------------------------------------------------------------------------------
def _record(tokenizer) -> StepRecord:
    texts = [("review: good", " great film"), ("review: bad", " awful plot")]
    rows = []
    for prompt, response in texts + [(p, " the movie") for p, _ in texts]:
        p_ids = tokenizer(prompt).input_ids
        r_ids = tokenizer(response, add_special_tokens=False).input_ids
        rows.append((p_ids + r_ids, [-100] * len(p_ids) + r_ids))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    batch = PreferenceBatch(ids, (labels != -100).long() | (ids != 0).long(), labels)
    _, resp = batch.shifted_labels()
    reward = torch.arange(resp.numel(), dtype=torch.float).reshape(resp.shape) % 3 * resp
    zeros = torch.zeros(resp.shape[0] // 2)
    stats = TokenStats(torch.zeros(resp.shape), torch.zeros(resp.shape), torch.zeros(resp.shape), response_mask=resp)
    out = LossOutput(zeros, zeros, zeros, zeros, zeros)
    return StepRecord("val", batch, stats, TokenMasks(reward, reward.flip(-1) * resp, common=False), out, {})


def test_heatmap_pairs_decode_responses_with_their_mask_values(tiny_tokenizer):
    record = _record(tiny_tokenizer)
    pairs = pairs_from_record(record, tiny_tokenizer, limit=5, max_tokens=64)
    assert len(pairs) == 2
    _, resp = record.batch.shifted_labels()
    assert "".join(pairs[0].chosen.tokens) == " great film"
    assert "".join(pairs[1].rejected.tokens) == " the movie"
    assert pairs[0].prompt.endswith("review: good")
    assert pairs[0].chosen.reward == record.masks.reward[0][resp[0]].tolist()
    assert pairs[1].rejected.kl == record.masks.kl[3][resp[3]].tolist()
    image = render_pair(pairs[0])
    assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3 and image.shape[1] == 960
    page = render_html(pairs, step=7)
    assert "step 7" in page and "KL mask" in page and "title='m=0'" in page
    assert f">{pairs[0].chosen.tokens[-1]}</span>" in page


@pytest.fixture(scope="module")
def tiny_module(tiny_model_dir):
    seed_everything(0)
    return PreferenceModule(model=tiny_model_dir, objective=SparsePO(), lr=1e-3)


def test_generation_policy_equals_reference_before_training_and_keeps_rng(tiny_module, tiny_tokenizer):
    """Before any update the policy is the reference, so greedy completions are identical (a known answer); the
    callback samples inside fork_rng, so the global RNG stream is unchanged; sampling is reproducible by seed."""
    prompts = [tiny_tokenizer("hello there", return_tensors="pt").input_ids[0]]
    greedy = GenerationSamples(max_new_tokens=6)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    samples = greedy.generate(tiny_module, tiny_tokenizer, prompts)
    assert torch.equal(torch.rand(3), expected_next), "generation changed the training RNG"
    assert samples[0]["prompt"] == "hello there"
    assert samples[0]["policy"] == samples[0]["reference"]
    sampler = GenerationSamples(max_new_tokens=6, temperature=1.0, seed=5)
    first = sampler.generate(tiny_module, tiny_tokenizer, prompts)
    assert sampler.generate(tiny_module, tiny_tokenizer, prompts) == first


# ---- presets through the CLI ----------------------------------------------------------------------------------
def test_second_config_replaces_the_callback_list(capsys, monkeypatch):
    """jsonargparse replaces lists from a later config: default + analysis gives analysis's 6 callbacks, not 10."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/debug/tiny.yaml", "--config", "callbacks/default.yaml",
              "--config", "callbacks/analysis.yaml", "--print_config"])
    printed = capsys.readouterr().out
    assert printed.count("class_path: sparsepo_lightning.callbacks.") == 4
    assert printed.count("class_path: sparsepo_lightning.checkpointing.RunCheckpoint") == 1
    assert printed.count("class_path: lightning.pytorch.callbacks.LearningRateMonitor") == 1


def test_fit_with_analysis_preset_writes_scalars_histograms_images_and_text(tiny_model_dir, pairs_file, tmp_path,
                                                                            monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = main(["fit", "--config", "configs/debug/tiny.yaml", "--config", "callbacks/analysis.yaml",
                "--model.model", tiny_model_dir, "--data.train_file", pairs_file, "--data.val_file", pairs_file,
                "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.max_steps", "2",
                "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"])
    log_dir = Path(cli.trainer.logger.log_dir)
    tags = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "images": 0, "histograms": 0}).Reload().Tags()
    for tag in ("train_step/masks/sparsity_reward_chosen", "train_step/masks/l1_kl_rejected",
                "train_step/masks/dead_units_reward", "train_step/rewards/margin", "train_step/kl/token_chosen",
                "val_epoch/masks/sparsity_kl_rejected", "val_epoch/rewards/accuracy", "val_epoch/logps/chosen",
                "lr-AdamW/policy", "lr-AdamW/mask"):
        assert tag in tags["scalars"], f"{tag} missing; got {sorted(tags['scalars'])}"
    assert {"val_epoch/masks/reward_chosen", "val_epoch/masks/reward_rejected"} <= set(tags["histograms"])
    assert {"heatmaps/pair_0", "heatmaps/pair_1"} <= set(tags["images"])
    assert "samples/prompt_0/text_summary" in tags["tensors"]
    assert (log_dir / "heatmaps" / "step_2.html").is_file()
    assert list((log_dir / "checkpoints").glob("last.ckpt"))


def test_quickstart_with_analysis_preset_writes_heatmap_images(tmp_path, monkeypatch):
    """The issue's check on the real thing: the quickstart (SmolLM2, shipped pairs) + analysis.yaml, 2 steps."""
    pytest.importorskip("gguf")
    monkeypatch.chdir(ROOT)
    # Smaller than the quickstart where it does not matter here: no sanity validation (the tiny-model test above
    # runs one), 2 pairs per batch (the two heat-map pairs), 48 tokens, the preset's samples cut to 4 new tokens
    # (greedy decoding of the 135M model is most of this test's time otherwise) and no checkpoint.
    preset = yaml.safe_load((ROOT / "callbacks" / "analysis.yaml").read_text())
    (samples,) = [c for c in preset["trainer"]["callbacks"] if c["class_path"].endswith("GenerationSamples")]
    samples["init_args"]["max_new_tokens"] = 4
    preset["trainer"]["callbacks"] = [c for c in preset["trainer"]["callbacks"]  # no 1.6 GB checkpoint to write
                                      if not c["class_path"].endswith("RunCheckpoint")]
    (tmp_path / "analysis.yaml").write_text(yaml.safe_dump(preset))
    cli = main(["fit", "--config", "configs/quickstart.yaml", "--config", str(tmp_path / "analysis.yaml"),
                "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.max_steps", "2",
                "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                "--trainer.num_sanity_val_steps", "0", "--data.init_args.batch_size", "2",
                "--data.init_args.max_length", "48"])
    log_dir = Path(cli.trainer.logger.log_dir)
    tags = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "images": 0, "histograms": 0}).Reload().Tags()
    assert {"heatmaps/pair_0", "heatmaps/pair_1"} <= set(tags["images"])
    assert {"train_step/masks/sparsity_reward_chosen", "val_epoch/rewards/accuracy"} <= set(tags["scalars"])
    assert "val_epoch/masks/reward_chosen" in tags["histograms"]  # common mask: one histogram per side
    assert "samples/prompt_0/text_summary" in tags["tensors"]
    assert (log_dir / "heatmaps" / "step_2.html").is_file()
