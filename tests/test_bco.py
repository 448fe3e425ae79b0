"""BCO (arXiv 2404.04656): the loss on pairs and on unpaired examples, the running reward shift δ (hand-computed
values, a naive per-row loop, identities), δ's checkpoint state, and δ synchronised across 2 gloo processes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp

from sparsepo_lightning import bco_loss
from sparsepo_lightning.checkpointing import OBJECTIVE_STATE, load_module_state, save_module_state
from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.losses import bco_rewards
from sparsepo_lightning.objectives import BCO, DPO
from sparsepo_lightning.running_mean import RunningMean
from sparsepo_lightning.types import PreferenceBatch, TokenStats
from tests.distributed_launch import free_port


def stats_with_rewards(rewards: list[float], beta: float = 0.1) -> TokenStats:
    """One response token per row whose log-ratio makes the row's reward β Σρ equal ``rewards[i]``."""
    rho = torch.tensor(rewards, dtype=torch.float32)[:, None] / beta
    return TokenStats(policy_logps=rho, reference_logps=torch.zeros_like(rho),
                      response_mask=torch.ones_like(rho, dtype=torch.bool))


def batch_of(rows: int, desirable: list[bool] | None = None) -> PreferenceBatch:
    ids = torch.zeros(rows, 2, dtype=torch.long)
    return PreferenceBatch(ids, torch.ones_like(ids), ids,
                           desirable=None if desirable is None else torch.tensor(desirable))


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # −log σ(−x)


# ---- hand-computed values ---------------------------------------------------------------------------------------
def test_hand_computed_shift_and_losses():
    bco = BCO()
    assert bco.beta == 0.1
    stats = stats_with_rewards([0.2, -0.1, 0.05, -0.3])  # pairs: (0.2, 0.05), (-0.1, -0.3)
    out = bco.step(stats, None, batch_of(4), training=True)
    delta = float(bco.reward_shift.mean)
    assert delta == pytest.approx(-0.0375, abs=1e-7)  # mean of the 4 rewards
    chosen_term = -math.log(1 / (1 + math.exp(-(0.2 + 0.0375))))
    rejected_term = -math.log(1 / (1 + math.exp(-(0.3 - 0.0375))))
    assert round(chosen_term, 4) == 0.5814 and round(rejected_term, 4) == 0.5705
    # −log σ(x) = softplus(−x)
    expected = [chosen_term + softplus(0.05 + 0.0375), softplus(0.1 - 0.0375) + rejected_term]
    torch.testing.assert_close(out.loss, torch.tensor(expected))
    torch.testing.assert_close(out.logit, torch.tensor([0.15, 0.2]))  # r_w − r_l
    torch.testing.assert_close(out.chosen_reward, torch.tensor([0.2, -0.1]))
    bco.step(stats_with_rewards([0.4, 0.0]), None, batch_of(2), training=True)
    assert float(bco.reward_shift.mean) == pytest.approx(0.25 / 6, abs=1e-7)  # (−0.15 + 0.4) / 6 = 0.0417
    assert round(float(bco.reward_shift.mean), 4) == 0.0417 and int(bco.reward_shift.count) == 6


def test_hand_computed_unpaired_losses():
    bco = BCO()
    out = bco.step(stats_with_rewards([0.2, -0.3]), None, batch_of(2, [True, False]), training=False)
    assert float(bco.reward_shift.mean) == 0 and int(bco.reward_shift.count) == 0  # not a training step
    bco.reward_shift.update(torch.tensor([0.2, -0.1, 0.05, -0.3]))
    out = bco(stats_with_rewards([0.2, -0.3]), desirable=torch.tensor([True, False]))
    assert [round(v, 4) for v in out.loss.tolist()] == [0.5814, 0.5705]
    torch.testing.assert_close(out.logit, torch.tensor([0.2375, 0.2625]))  # s(r − δ): both classified right
    torch.testing.assert_close(out.chosen_reward, torch.tensor([0.2, 0.0]))
    torch.testing.assert_close(out.rejected_reward, torch.tensor([0.0, -0.3]))


# ---- a naive per-row loop -----------------------------------------------------------------------------------------
def naive_bco(batches: list[tuple[list[list[float]], list[bool] | None]], beta: float) -> list[list[float]]:
    """Per batch of rows of per-token log-ratios: δ from every reward so far (this batch included), then the loss of
    each pair (``labels`` None: first half chosen) or of each example, with Python floats."""
    seen, losses = [], []
    for rows, labels in batches:
        rewards = [beta * sum(row) for row in rows]
        seen += rewards
        delta = sum(seen) / len(seen)
        if labels is None:
            half = len(rows) // 2
            losses.append([softplus(-(rewards[i] - delta)) + softplus(rewards[half + i] - delta) for i in range(half)])
        else:
            losses.append([softplus(-(r - delta)) if good else softplus(r - delta)
                           for r, good in zip(rewards, labels, strict=True)])
    return losses


def random_batch(g: torch.Generator, rows: int, labelled: bool) -> tuple[TokenStats, list[list[float]], list | None]:
    lengths = torch.randint(1, 6, (rows,), generator=g)
    mask = torch.arange(6)[None, :] < lengths[:, None]
    policy, reference = -3 * torch.rand(rows, 6, generator=g), -3 * torch.rand(rows, 6, generator=g)
    stats = TokenStats(policy_logps=policy * mask, reference_logps=reference * mask, response_mask=mask)
    ratios = [[float(policy[i, t] - reference[i, t]) for t in range(int(lengths[i]))] for i in range(rows)]
    labels = [bool(v) for v in torch.randint(0, 2, (rows,), generator=g)] if labelled else None
    return stats, ratios, labels


@pytest.mark.parametrize("labelled", [False, True], ids=["pairs", "unpaired"])
def test_matches_a_naive_per_row_loop(labelled):
    g = torch.Generator().manual_seed(3)
    bco, batches, losses = BCO(beta=0.3), [], []
    for rows in (4, 6, 2, 8):
        stats, ratios, labels = random_batch(g, rows, labelled)
        batches.append((ratios, labels))
        desirable = None if labels is None else labels
        losses.append(bco.step(stats, None, batch_of(rows, desirable), training=True).loss.tolist())
    for ours, naive in zip(losses, naive_bco(batches, 0.3), strict=True):
        assert ours == pytest.approx(naive, rel=1e-5, abs=1e-6)


# ---- identities ---------------------------------------------------------------------------------------------------
def test_pairs_and_the_same_rows_unpaired_agree():
    """A batch of pairs, read as 2B unpaired examples (chosen desirable, rejected undesirable): the same δ, and each
    pair's loss is the sum of its two examples' losses."""
    g = torch.Generator().manual_seed(0)
    paired, unpaired = BCO(), BCO()
    for _ in range(3):
        stats, _, _ = random_batch(g, 6, labelled=False)
        pair_out = paired.step(stats, None, batch_of(6), training=True)
        example_out = unpaired.step(stats, None, batch_of(6, [True] * 3 + [False] * 3), training=True)
        torch.testing.assert_close(paired.reward_shift.mean, unpaired.reward_shift.mean)
        torch.testing.assert_close(pair_out.loss, example_out.loss[:3] + example_out.loss[3:])


def test_policy_equal_to_reference_gives_log_2_per_example():
    zeros = stats_with_rewards([0.0] * 4)
    bco = BCO()
    torch.testing.assert_close(bco.step(zeros, None, batch_of(4), True).loss, torch.full((2,), 2 * math.log(2)))
    torch.testing.assert_close(bco.step(zeros, None, batch_of(4, [True, False, False, True]), True).loss,
                               torch.full((4,), math.log(2)))
    assert float(bco.reward_shift.mean) == 0.0


def test_a_constant_reward_offset_is_absorbed_by_the_shift():
    """δ is the mean of all rewards, so adding c to every reward shifts δ by c and leaves every loss unchanged."""
    g = torch.Generator().manual_seed(1)
    plain, offset = BCO(), BCO()
    for _ in range(3):
        stats, _, labels = random_batch(g, 4, labelled=True)
        moved = TokenStats(policy_logps=stats.policy_logps, reference_logps=stats.reference_logps - 0.5 * (
            stats.response_mask / stats.response_mask.sum(-1, keepdim=True)), response_mask=stats.response_mask)
        a = plain.step(stats, None, batch_of(4, labels), True).loss
        b = offset.step(moved, None, batch_of(4, labels), True).loss
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(offset.reward_shift.mean, plain.reward_shift.mean + 0.1 * 0.5)


def test_the_loss_gradient_reaches_the_policy_not_the_shift():
    stats = stats_with_rewards([0.2, -0.1, 0.05, -0.3])
    stats.policy_logps.requires_grad_(True)
    bco = BCO()
    out = bco.step(stats, None, batch_of(4), training=True)
    out.loss.sum().backward()
    # d/dr [−log σ(r_w − δ)] = −σ(−(r_w − δ)) < 0 for chosen rows, > 0 for rejected rows; δ is a constant
    grad = stats.policy_logps.grad[:, 0] / 0.1
    expected = [-torch.sigmoid(torch.tensor(-(r + 0.0375))) for r in (0.2, -0.1)]
    expected += [torch.sigmoid(torch.tensor(r + 0.0375)) for r in (0.05, -0.3)]
    torch.testing.assert_close(grad, torch.stack(expected))


# ---- δ as state -------------------------------------------------------------------------------------------------
def test_shift_is_not_updated_outside_training_steps():
    bco = BCO()
    bco.step(stats_with_rewards([0.2, -0.1, 0.05, -0.3]), None, batch_of(4), training=True)
    before = bco.state_dict()
    for desirable in (None, [True, False, True, False]):
        bco.step(stats_with_rewards([5.0, 5.0, 5.0, 5.0]), None, batch_of(4, desirable), training=False)
    after = bco.state_dict()["reward_shift"]
    assert torch.equal(after["mean"], before["reward_shift"]["mean"]) and int(after["count"]) == 4


def test_shift_state_survives_a_checkpoint_dict_round_trip(tmp_path):
    g = torch.Generator().manual_seed(2)
    bco = BCO()
    for _ in range(3):
        bco.step(random_batch(g, 4, False)[0], None, batch_of(4), training=True)
    checkpoint = {"state_dict": {"policy.w": torch.ones(1), "reference.w": torch.ones(1)}}
    save_module_state(checkpoint, bco, {"reference.w"}, strategy=None)
    assert set(checkpoint["state_dict"]) == {"policy.w"} and OBJECTIVE_STATE in checkpoint
    torch.save(checkpoint, tmp_path / "c.ckpt")
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)  # how AtomicCheckpointIO loads it
    resumed = BCO()
    own = {"policy.w": torch.ones(1), "reference.w": torch.ones(1)}
    load_module_state(loaded, resumed, {"reference.w"}, lambda: own)
    assert set(loaded["state_dict"]) == {"policy.w", "reference.w"}  # the frozen keys are put back for strict loading
    assert torch.equal(resumed.reward_shift.mean, bco.reward_shift.mean)
    assert torch.equal(resumed.reward_shift.count, bco.reward_shift.count)
    stats = random_batch(g, 6, True)
    a = bco.step(stats[0], None, batch_of(6, stats[2]), training=True)
    b = resumed.step(stats[0], None, batch_of(6, stats[2]), training=True)
    assert torch.equal(a.loss, b.loss) and torch.equal(bco.reward_shift.mean, resumed.reward_shift.mean)


def test_stateless_objectives_add_nothing_to_checkpoints_and_bco_warns_without_its_state():
    checkpoint = {"state_dict": {}}
    save_module_state(checkpoint, DPO(), set(), strategy=None)
    assert OBJECTIVE_STATE not in checkpoint
    bco = BCO()
    bco.reward_shift.update(torch.tensor([1.0]))
    with pytest.warns(UserWarning, match="no reward shift"):
        load_module_state(checkpoint, bco, set(), dict)
    assert float(bco.reward_shift.mean) == 0 and int(bco.reward_shift.count) == 0


def test_non_finite_rewards_do_not_enter_the_shift():
    shift = RunningMean()
    shift.update(torch.tensor([1.0, float("nan"), 3.0, float("inf")]))
    assert float(shift.mean) == 2.0 and int(shift.count) == 2
    shift.update(torch.tensor([float("nan")]))
    assert float(shift.mean) == 2.0 and int(shift.count) == 2


# ---- errors -------------------------------------------------------------------------------------------------------
def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="beta must be > 0"):
        BCO(beta=0.0)
    with pytest.raises(ValueError, match="desirable must be a bool tensor of shape"):
        bco_loss(stats_with_rewards([0.1, 0.2]), 0.1, 0.0, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="Expected 2B rows"):
        bco_loss(stats_with_rewards([0.1, 0.2, 0.3]), 0.1, 0.0)
    with pytest.raises(ConfigError, match="DPO learns from preference pairs.*Fix: model.objective"):
        DPO().step(stats_with_rewards([0.1, 0.2]), None, batch_of(2, [True, False]), training=True)
    with pytest.raises(ValueError, match="unpaired examples"):
        _ = batch_of(2, [True, False]).num_pairs


def test_rewards_are_float32_sums_over_the_response():
    stats = TokenStats(policy_logps=torch.tensor([[-1.0, -2.0, 0.0]]),
                       reference_logps=torch.tensor([[-1.5, -1.0, 0.0]]),
                       response_mask=torch.tensor([[True, True, False]]))
    rewards = bco_rewards(stats, 0.5)
    assert rewards.dtype == torch.float32
    torch.testing.assert_close(rewards, torch.tensor([0.5 * (0.5 - 1.0)]))


# ---- δ across ranks ------------------------------------------------------------------------------------------------
def _rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        bco = BCO()
        # rank 0 holds 4 rows, rank 1 holds 2: the shift is the mean of all 6, each counted once
        rewards = [[0.2, -0.1, 0.05, -0.3], [0.4, 0.0]][rank]
        out = bco.step(stats_with_rewards(rewards), None, batch_of(len(rewards), [True] * len(rewards)), True)
        results[rank] = (float(bco.reward_shift.mean), int(bco.reward_shift.count), out.loss.tolist())
    finally:
        dist.destroy_process_group()


def test_shift_is_the_mean_over_all_ranks():
    """Two gloo processes with different rewards (and batch sizes) end with the same δ: the mean of all rewards."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(free_port(), results), nprocs=2, join=True)
        results = dict(results)
    (delta0, count0, loss0), (delta1, count1, loss1) = results[0], results[1]
    assert delta0 == delta1 == pytest.approx(0.25 / 6, abs=1e-7) and count0 == count1 == 6
    assert loss0 == pytest.approx([softplus(-(r - 0.25 / 6)) for r in (0.2, -0.1, 0.05, -0.3)], rel=1e-5)
    assert loss1 == pytest.approx([softplus(-(r - 0.25 / 6)) for r in (0.4, 0.0)], rel=1e-5)
