"""``data.layout: auto`` (``sparsepo_lightning/data/layout_cost.py``): the work estimate by hand, its agreement with
what was measured at full depth, its decisions on the three mixes against a brute-force search over packed batches,
and the collate it drives."""

from __future__ import annotations

import random

import pytest
from transformers import LlamaConfig

from sparsepo_lightning.data.batching import check_batching
from sparsepo_lightning.data.collate_packed import collate_packed
from sparsepo_lightning.data.layout_cost import (
    BOUNDS,
    PADDED,
    SMOLLM2_RATIO,
    attention_ratio,
    choose_layout,
    collate_auto,
    packed_work,
    padded_work,
)
from sparsepo_lightning.errors import ConfigError

R = SMOLLM2_RATIO


def _pair(prompt: int, chosen: int, rejected: int, start: int = 10) -> dict[str, list[int]]:
    """A pair whose prompt is ``prompt`` tokens and whose responses differ from their first token."""
    p = list(range(start, start + prompt))
    c, r = [1] * chosen, [2] * rejected
    return {"chosen_input_ids": p + c, "chosen_labels": [-100] * prompt + c,
            "rejected_input_ids": p + r, "rejected_labels": [-100] * prompt + r}


def test_attention_ratio_of_smollm2_by_hand():
    """d = 576, 9 heads with 3 KV heads (d_kv = 192), gated MLP of 1536: 4·576 / 2(2·576² + 2·576·192 + 3·576·1536)
    = 2304 / 7,077,888."""
    config = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536)
    assert attention_ratio(config) == pytest.approx(2304 / 7_077_888) == SMOLLM2_RATIO


def test_the_estimate_reproduces_the_full_depth_measurements():
    """4 pairs of prompt 128 + 384 + 384 (T = 512, segments of 896). Padded: 4096 + r·8·512·513/2. One packed row
    of 3584: 3584 + r·3584² = 1.75× padded (1.61× measured); rows of one pair: 3584 + r·4·896² = 1.04× (1.02–1.04×
    measured). Both lose: auto keeps the padded layout."""
    features = [_pair(128, 384, 384)] * 4
    padded = padded_work(8, 512, R)
    assert padded == pytest.approx(4096 + R * 8 * 512 * 513 / 2)
    one_row, positions = packed_work([896] * 4, None, R)
    assert positions == 3584 and one_row == pytest.approx(3584 + R * 3584**2)
    assert one_row / padded == pytest.approx(1.75, abs=0.01)
    per_pair, _ = packed_work([896] * 4, 896, R)
    assert per_pair / padded == pytest.approx(1.043, abs=0.005)
    assert choose_layout(features, R) == PADDED


def test_long_shared_prompts_pack_and_short_pairs_pack_into_few_rows():
    """HH-like: prompt 448 + 64 + 64 (T = 512, segments of 576): rows of one pair cost 2304 + r·4·576² against
    padded 4438, 1.6× less: auto packs with the bound 576. Quickstart-like: prompt 16 + 16 + 16 (T = 32, segments
    of 48): 192 positions against 256 padded; one pair per row (192 + r·4·48²) beats one row of 192 (192 + r·192²):
    bound 48. ``pack_length`` caps the bounds (a longer segment gets a row of its own)."""
    assert choose_layout([_pair(448, 64, 64)] * 4, R) == 576
    assert padded_work(8, 512, R) / packed_work([576] * 4, 576, R)[0] == pytest.approx(1.62, abs=0.01)
    assert choose_layout([_pair(16, 16, 16)] * 4, R) == 48
    assert packed_work([48] * 4, 48, R)[0] < packed_work([48] * 4, 192, R)[0] < padded_work(8, 32, R)
    assert choose_layout([_pair(16, 16, 16)] * 4, R, pack_length=30) == 30


def _brute_force(features, ratio):
    """The cheapest of padded and every packed bound k × longest segment, each priced from the batch that
    collate_packed actually builds (rows × length of its packed input_ids), kept only within the padded positions."""
    longest = max(max(len(f["chosen_input_ids"]), len(f["rejected_input_ids"])) for f in features)
    best, best_work = PADDED, padded_work(2 * len(features), longest, ratio)
    segment = max(len(f["chosen_input_ids"]) + len(f["rejected_input_ids"]) - f["chosen_labels"].count(-100)
                  for f in features)  # the prompt once: the responses differ from their first token
    for k in BOUNDS:
        rows, length = collate_packed(features, 0, pack_length=k * segment).packed.input_ids.shape
        work = rows * length + ratio * rows * length * length
        if rows * length <= 2 * len(features) * longest and work < best_work:
            best, best_work = k * segment, work
    return best


def test_decisions_equal_a_brute_force_search_over_collated_batches():
    rng = random.Random(0)
    for _ in range(40):
        features = [_pair(rng.randint(1, 300), rng.randint(1, 200), rng.randint(1, 200), start=10 + i)
                    for i in range(rng.randint(1, 6))]
        ratio = rng.choice([SMOLLM2_RATIO, 1e-3, 1e-5])
        assert choose_layout(features, ratio) == _brute_force(features, ratio)


def test_collate_auto_builds_the_chosen_layout():
    short = collate_auto([_pair(16, 16, 16)] * 4, pad_token_id=0, ratio=R)
    assert short.packed is not None and short.packed.input_ids.shape == (4, 48)
    long = collate_auto([_pair(128, 384, 384)] * 2, pad_token_id=0, ratio=R)
    assert long.packed is None and long.input_ids.shape == (4, 512)


def test_auto_is_checked_like_packed():
    check_batching("auto", None, 1024, 512, paired=True)
    with pytest.raises(ConfigError, match="data.layout=auto packs the two responses.*data.layout: padded"):
        check_batching("auto", None, None, 512, paired=False)
    with pytest.raises(ConfigError, match="must be padded, packed or auto"):
        check_batching("dense", None, None, 512, paired=True)
