"""Prompt variants in the data (rendering, tokenisation, collation, token budget, cache key, layout check) and T-REG
on them: its token weights and loss against numbers worked by hand (2-3 tokens) and per-row loops, and a 2-step fit
through `sparsepo fit` whose variant log-probs and loss equal a naive recomputation from full logits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from sparsepo_lightning.data import PreferenceDataModule
from sparsepo_lightning.data.batching import budget_batches
from sparsepo_lightning.data.collate import collate_pairs
from sparsepo_lightning.data.collate_packed import collate_packed, packed_cost, padded_cost
from sparsepo_lightning.data.rows import DataReport, PreferencePair
from sparsepo_lightning.data.token_cache import cache_key
from sparsepo_lightning.data.tokenize import tokenize_pair
from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.losses import dpo_loss
from sparsepo_lightning.methods.treg import BETTER, TREG, WORSE, token_weights
from sparsepo_lightning.prompt_variants import declared_variants, render_prompt
from sparsepo_lightning.types import IGNORE_INDEX, PreferenceBatch, TokenStats

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = {"good": "Answer well.\n{prompt}", "bad": "Answer badly.\n{prompt}"}


# ---- prompt variants: rendering and data ---------------------------------------------------------------------------
def test_render_prompt_plain_and_chat():
    assert render_prompt("2+2?", "Be right.\n{prompt}") == "Be right.\n2+2?"
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]
    rendered = render_prompt(chat, "Be right. {prompt}")
    assert [m["content"] for m in rendered] == ["s", "a", "b", "Be right. c"]
    assert chat[3]["content"] == "c"  # the row itself is not changed


def test_variant_rows_are_the_variant_prompt_plus_the_same_response_tokens(tiny_tokenizer):
    """Each variant row equals tokenising the rendered pair directly; it scores exactly the tokens the original row
    scores (same count, same ids, same order); an empty prompt keeps that alignment."""
    pairs = [PreferencePair("review one: good", " a fine film", " bad bad"), PreferencePair("", "x y z", "w")]
    features = [tokenize_pair(p, tiny_tokenizer, max_length=64, max_prompt_length=32, prompt_variants=TEMPLATES,
                              add_bos=bool(p.prompt)) for p in pairs]  # the second row starts with its response
    assert features[1]["chosen_labels"][0] != IGNORE_INDEX
    assert [f.pop("variant_prompt_truncated") for f in features] == [0, 0]
    batch = collate_packed(features, tiny_tokenizer.pad_token_id)  # the padded batch, and each variant packed
    labels, mask = batch.shifted_labels()
    assert sorted(batch.prompt_variants) == ["bad", "good"]
    assert all(rows.packed is not None for rows in batch.prompt_variants.values())
    for name, template in TEMPLATES.items():
        rows = batch.prompt_variants[name]
        v_labels, v_mask = rows.shifted_labels()
        assert torch.equal(v_mask.sum(-1), mask.sum(-1))
        for r in range(4):
            assert torch.equal(v_labels[r][v_mask[r]], labels[r][mask[r]])
        direct = tokenize_pair(PreferencePair(render_prompt(pairs[0].prompt, template), pairs[0].chosen,
                                              pairs[0].rejected), tiny_tokenizer, max_length=64, max_prompt_length=32)
        n = len(direct["chosen_input_ids"])
        assert rows.input_ids[0, :n].tolist() == direct["chosen_input_ids"]
        assert rows.labels[0, :n].tolist() == direct["chosen_labels"]


def test_chat_rows_get_the_instruction_in_their_last_user_message(tiny_tokenizer):
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    pair = PreferencePair(prompt, [{"role": "assistant", "content": "hello"}], [{"role": "assistant", "content": "no"}])
    features = tokenize_pair(pair, tiny_tokenizer, max_length=96, max_prompt_length=64, prompt_variants=TEMPLATES)
    batch = collate_pairs([features], tiny_tokenizer.pad_token_id)
    direct = tokenize_pair(PreferencePair(render_prompt(prompt, TEMPLATES["good"]), pair.chosen, pair.rejected),
                           tiny_tokenizer, max_length=96, max_prompt_length=64)
    rows = batch.prompt_variants["good"]
    n = len(direct["rejected_input_ids"])
    assert rows.input_ids[1, :n].tolist() == direct["rejected_input_ids"]
    assert "<|user|>\nAnswer well.\nhi there" in tiny_tokenizer.decode(rows.input_ids[1, :n])


def test_the_data_module_adopts_the_methods_variants_and_the_step_needs_them(tiny_tokenizer, pairs_file):
    from types import SimpleNamespace

    from sparsepo_lightning.data.datamodule_options import adopt_prompt_variants
    from sparsepo_lightning.distribution_step import variant_logps

    dm = PreferenceDataModule(train_file=pairs_file)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(objective=TREG(), masker=None))
    adopt_prompt_variants(dm)
    assert dm.prompt_variants == TREG().prompt_variants()
    dm = PreferenceDataModule(train_file=pairs_file, prompt_variants={BETTER: "Other.\n{prompt}"})
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(objective=TREG(), masker=None))
    with pytest.raises(ConfigError, match="differs from the template the method declares"):
        adopt_prompt_variants(dm)
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="the batch carries no rows for them"):
        variant_logps(None, PreferenceBatch(ids, ids, ids), TREG().prompt_variants(), 8)


def test_variant_prompts_are_cut_to_fit_and_counted(tiny_tokenizer):
    pair = PreferencePair("p " * 10, " one two three four", " five")
    long = {"long": "words " * 30 + "{prompt}"}
    features = tokenize_pair(pair, tiny_tokenizer, max_length=24, max_prompt_length=12, prompt_variants=long)
    assert features["variant_prompt_truncated"] == 1
    response = sum(label != IGNORE_INDEX for label in features["chosen_labels"])
    assert len(features["variant_long_prompt_ids"]) + response == 24
    assert features["variant_long_prompt_ids"][0] == tiny_tokenizer.bos_token_id  # keep_end keeps the BOS
    report = DataReport(source="f.jsonl", rows_read=1, prompt_variants=["long"], variant_prompts_truncated=1)
    assert "prompt variants: long" in report.summary() and "1 pairs with a variant prompt cut" in report.summary()


def test_the_padded_token_budget_counts_variant_rows():
    feature = {"chosen_input_ids": [1, 5, 6, 7], "chosen_labels": [-100, -100, 6, 7],
               "rejected_input_ids": [1, 5, 8], "rejected_labels": [-100, -100, 8],
               "variant_a_prompt_ids": [1, 9, 9, 9, 5]}
    # 2 rows × 4 (longest pair row) + 2 rows × (5 + 2) (longest variant row) = 22
    assert padded_cost([feature]) == 2 * 4 + 2 * 7
    assert padded_cost([{k: v for k, v in feature.items() if not k.startswith("variant")}]) == 8
    # by token budget: one pair costs 22, two 44; without the variant rows two would cost 16 and share a batch
    assert budget_batches([feature] * 3, 30, "padded", None, [0, 1, 2]) == [[0], [1], [2]]
    assert budget_batches([feature] * 3, 44, "padded", None, [0, 1, 2]) == [[0, 1], [2]]
    # packed: the pair's segment [1 5 | 6 7 | 8] is 5 tokens, the variant's [1 9 9 9 5 | 6 7 | 8] 8; one row each
    assert packed_cost([feature]) == 5 + 8 and packed_cost([feature] * 2) == 10 + 16
    assert budget_batches([feature] * 3, 26, "packed", None, [0, 1, 2]) == [[0, 1], [2]]


def test_the_cache_key_covers_the_templates(tiny_tokenizer, pairs_file):
    def key(**kwargs):
        dm = PreferenceDataModule(train_file=pairs_file, **kwargs)
        dm.tokenizer = tiny_tokenizer
        return cache_key(dm, ("train", "val"))[0]

    assert len({key(), key(prompt_variants=TEMPLATES), key(prompt_variants={**TEMPLATES, "bad": "No.\n{prompt}"})}) == 3
    with pytest.raises(ConfigError, match="exactly one \\{prompt\\}"):
        TREG(better_template="no placeholder")
    with pytest.raises(ConfigError, match="different templates"):
        declared_variants(TREG(), TREG(better_template="Other.\n{prompt}"))


# ---- T-REG: weights and loss by hand ------------------------------------------------------------------------------
MASK = torch.tensor([[True, True, False], [True, True, True]])  # chosen: 2 tokens, rejected: 3
RHO = torch.tensor([[0.2, -0.4, 0.0], [0.1, 0.3, -0.2]])
BETTER_LOGPS = torch.tensor([[-1.0, -2.0, 0.0], [-2.0, -1.0, -1.0]])
WORSE_LOGPS = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, -1.0, -2.0]])  # r: chosen [0.5, -1], rejected [-1, 0, 1]


def _stats(rho=RHO, better=BETTER_LOGPS, worse=WORSE_LOGPS, mask=MASK) -> TokenStats:
    return TokenStats(rho * mask, torch.zeros_like(rho), response_mask=mask,
                      variant_logps={BETTER: better * mask, WORSE: worse * mask})


def test_token_weights_by_hand():
    w = token_weights(_stats().variant_logps[BETTER] - _stats().variant_logps[WORSE], MASK)
    # chosen: 2·softmax([0.5, −1]) = 2·[e^.5, e^−1]/(e^.5 + e^−1) = [1.635149, 0.364851]
    # rejected (sign −1): 3·softmax([1, 0, −1]) = 3·[e, 1, e^−1]/(e + 1 + e^−1) = [1.995723, 0.734184, 0.270092]
    assert_close(w, torch.tensor([[1.635149, 0.364851, 0.0], [1.995723, 0.734184, 0.270092]]), atol=3e-6, rtol=0)


def test_treg_loss_by_hand_and_its_identities():
    out = TREG(beta=0.5, alpha=0.5)(_stats())
    # DPO: logit 0.5·(−0.2 − 0.2) = −0.2, −log σ(−0.2) = log(1 + e^0.2) = 0.798139
    # weighted sums: chosen 1.635149·0.2 − 0.364851·0.4 = 0.181089; rejected 0.199572 + 0.220255 − 0.054018 = 0.365809
    # L_REG = −log σ(0.5·(0.181089 − 0.365809)) = log(1 + e^0.092360) = 0.740393; loss = 0.798139 + 0.5·0.740393
    assert_close(out.loss, torch.tensor([1.168336]), atol=1e-5, rtol=0)
    assert_close(out.logit, torch.tensor([-0.2]))
    dpo = dpo_loss(_stats(), 0.5).loss
    assert_close(TREG(beta=0.5, alpha=0.0)(_stats()).loss, dpo)  # α = 0: DPO
    same = _stats(worse=BETTER_LOGPS)  # r ≡ 0: every weight 1, L = (1 + α)·DPO
    assert_close(TREG(beta=0.5, alpha=0.5)(same).loss, 1.5 * dpo)


def test_treg_loss_equals_a_per_row_loop():
    g = torch.Generator().manual_seed(0)
    b, t = 3, 6
    lengths = torch.tensor([6, 1, 4, 3, 6, 2])
    mask = torch.arange(t)[None] < lengths[:, None]
    rho, better, worse = (torch.randn(2 * b, t, generator=g) for _ in range(3))
    objective = TREG(beta=0.3, alpha=0.7, temperature=0.5)
    out = objective(_stats(rho, better, worse, mask))
    for i in range(b):
        sums = []
        for row, sign in ((i, 1.0), (b + i, -1.0)):
            n = int(lengths[row])
            r = [float(better[row, k] - worse[row, k]) for k in range(n)]
            z = [math.exp(sign * x / 0.5) for x in r]
            w = [n * x / sum(z) for x in z]
            sums.append((sum(float(rho[row, k]) for k in range(n)), sum(w[k] * float(rho[row, k]) for k in range(n))))
        dpo = -F.logsigmoid(torch.tensor(0.3 * (sums[0][0] - sums[1][0])))
        reg = -F.logsigmoid(torch.tensor(0.3 * (sums[0][1] - sums[1][1])))
        assert_close(out.loss[i], dpo + 0.7 * reg, atol=1e-5, rtol=1e-5)


# ---- training through the CLI (tiny recipe) ------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_treg_trains_the_tiny_recipe_and_its_step_is_the_naive_one(layout, tiny_model_dir, pairs_file, tmp_path,
                                                                   monkeypatch):
    """2 steps through `sparsepo fit` with configs/methods/treg.yaml, in both layouts (packed: each variant packed on
    its own, its prompt the shared prefix); the data module adds T-REG's prompts by itself (named in the data report);
    the last (validation) step's variant log-probs are the policy's on the padded variant rows from full logits, and
    its loss the per-row T-REG loss of full-logit statistics."""
    from tests.test_methods_fit import _fit

    monkeypatch.chdir(ROOT)
    cli = _fit("treg", tiny_model_dir, tiny_model_dir, pairs_file, tmp_path, "--data.layout", layout)
    module = cli.model
    assert cli.trainer.global_step == 2
    assert cli.datamodule.prompt_variants == module.objective.prompt_variants()
    assert "prompt variants: treg_better, treg_worse" in cli.datamodule.report["train"].summary()
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and "train/treg/token_reward_chosen" in metrics

    record = module.last_step
    assert record.stage == "val"
    batch = record.batch
    labels, mask = batch.shifted_labels()
    assert all((rows.packed is not None) == (layout == "packed") for rows in batch.prompt_variants.values())

    def label_logps(model, rows):
        row_labels, row_mask = rows.shifted_labels()
        logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, row_labels[..., None]).squeeze(-1)[row_mask]

    with torch.no_grad():
        variants = {name: torch.zeros(mask.shape).masked_scatter(mask, label_logps(module.policy, rows))
                    for name, rows in batch.prompt_variants.items()}
        rho = label_logps(module.policy, batch) - label_logps(module.reference, batch)
    for name in (BETTER, WORSE):
        assert_close(record.stats.variant_logps[name], variants[name], rtol=1e-4, atol=1e-5)
    naive = TREG(beta=0.1, alpha=1.0)(TokenStats(torch.zeros(mask.shape).masked_scatter(mask, rho),
                                                 torch.zeros(mask.shape), response_mask=mask, variant_logps=variants))
    assert_close(record.out.loss, naive.loss, rtol=1e-4, atol=1e-5)
