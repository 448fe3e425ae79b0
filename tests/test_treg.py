"""Prompt variants in the data (rendering, tokenisation, collation, token budget, cache key, layout check) and T-REG
on them (arXiv 2412.02685 §3): its token rewards r̂, regulariser L_reg, sequence weight w and loss against numbers
worked by hand (2-3 tokens) and a naive per-row loop, the identities (r̂ ≡ 0 or α = 0: DPO), the stop-gradients on r̂
and w, the model that scores the variants (reference by default, policy as an option, the LoRA adapter-off
reference), and 2-step fits through `sparsepo fit` whose variant log-probs and loss equal a naive recomputation from
full logits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
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
from sparsepo_lightning.methods.treg import BETTER, TREG, WORSE, token_rewards
from sparsepo_lightning.prompt_variants import declared_scorers, declared_variants, render_prompt
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


# ---- T-REG: token rewards, regulariser, weight and loss by hand ---------------------------------------------------
MASK = torch.tensor([[True, True, False], [True, True, True]])  # one pair: chosen 2 tokens, rejected 3
POLICY = torch.tensor([[-1.0, -2.0, 0.0], [-1.5, -0.5, -1.0]])
REFERENCE = torch.tensor([[-1.2, -1.6, 0.0], [-1.6, -0.8, -0.8]])  # ρ: chosen [0.2, −0.4], rejected [0.1, 0.3, −0.2]
BETTER_LOGPS = torch.tensor([[-1.0, -2.0, 0.0], [-2.0, -1.0, -1.0]])
WORSE_LOGPS = torch.tensor([[-2.0, -1.5, 0.0], [-1.0, -1.0, -2.0]])  # better − worse: [1, −0.5], [−1, 0, 1]


def _stats(policy=POLICY, reference=REFERENCE, better=BETTER_LOGPS, worse=WORSE_LOGPS, mask=MASK) -> TokenStats:
    return TokenStats(policy * mask, reference * mask, response_mask=mask,
                      variant_logps={BETTER: better * mask, WORSE: worse * mask})


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_token_rewards_by_hand():
    """r̂ = σ(better − worse) − 0.5: σ(1) − 0.5 = 0.2310586, σ(−0.5) − 0.5 = −0.1224593, σ(0) − 0.5 = 0; 0 outside
    the response; bounded by ±0.5 however far apart the two prompts score."""
    r = token_rewards(_stats())
    assert_close(r, torch.tensor([[0.2310586, -0.1224593, 0.0], [-0.2310586, 0.0, 0.2310586]]), atol=1e-7, rtol=0)
    far = token_rewards(_stats(better=torch.full((2, 3), 50.0), worse=torch.full((2, 3), -50.0)))
    assert_close(far, 0.5 * MASK.float())


def test_treg_loss_by_hand():
    """β = 0.5, α = 0.5, one pair (the numbers of docs/treg.md):
    L_reg(y_w) = −0.5·(0.2310586·(−1) + (−0.1224593)·(−2)) = −0.5·0.0138600 = −0.0069300;
    L_reg(y_l) = −0.5·((−0.2310586)·(−1.5) + 0·(−0.5) + 0.2310586·(−1)) = −0.5·0.1155293 = −0.0577646;
    Σρ_w = −0.2, Σρ_l = 0.2: logit = 0.5·(−0.4) = −0.2, L_DPO = log(1 + e^0.2) = 0.7981389, w = σ(0.2) = 0.5498340;
    L = 0.7981389 + 0.5·0.5498340·(−0.0646947) = 0.7981389 − 0.0177857 = 0.7803532."""
    objective = TREG(beta=0.5, alpha=0.5)
    out = objective(_stats())
    assert_close(out.loss, torch.tensor([0.7803532]), atol=1e-6, rtol=0)
    assert_close(out.logit, torch.tensor([-0.2]))
    assert_close(out.chosen_reward, torch.tensor([-0.1]))
    assert_close(out.rejected_reward, torch.tensor([0.1]))
    batch = PreferenceBatch(*(torch.ones(2, 4, dtype=torch.long),) * 3)
    metrics = objective.metrics(_stats(), None, out, batch)
    assert_close(metrics["treg/token_reward_chosen"], torch.tensor((0.2310586 - 0.1224593) / 2))
    assert_close(metrics["treg/token_reward_rejected"], torch.tensor(0.0))
    assert_close(metrics["treg/sequence_weight"], torch.tensor(0.5498340))
    assert_close(metrics["treg/regulariser"], torch.tensor(0.5498340 * (-0.0069300 - 0.0577646)), atol=1e-6, rtol=0)
    # the defaults β = 0.1, α = 0.25: logit −0.04, L_DPO = 0.7133472, w = σ(0.04) = 0.5099987,
    # L_reg = 0.2·(−0.0069300), 0.2·(−0.0577646): L = 0.7133472 + 0.25·0.5099987·(−0.0129389) = 0.7116975
    assert_close(TREG()(_stats()).loss, torch.tensor([0.7116975]), atol=1e-6, rtol=0)


def test_treg_is_dpo_when_the_variants_score_equally_or_alpha_is_zero():
    dpo = dpo_loss(_stats(), 0.5)
    same = TREG(beta=0.5, alpha=0.5)(_stats(worse=BETTER_LOGPS))  # r̂ ≡ 0: L_reg = 0
    assert_close(same.loss, dpo.loss)
    assert_close(same.logit, dpo.logit)
    assert_close(TREG(beta=0.5, alpha=0.0)(_stats()).loss, dpo.loss)


def test_treg_loss_equals_a_per_row_loop():
    g = torch.Generator().manual_seed(0)
    b, t, beta, alpha = 3, 6, 0.3, 0.7
    lengths = torch.tensor([6, 1, 4, 3, 6, 2])
    mask = torch.arange(t)[None] < lengths[:, None]
    policy, reference, better, worse = (-torch.rand(2 * b, t, generator=g) * 3 for _ in range(4))
    out = TREG(beta=beta, alpha=alpha)(_stats(policy, reference, better, worse, mask))
    for i in range(b):
        rho_sum, reg = [], []
        for row in (i, b + i):
            n = int(lengths[row])
            rho_sum.append(sum(float(policy[row, k] - reference[row, k]) for k in range(n)))
            r_hat = [_sigmoid(float(better[row, k] - worse[row, k])) - 0.5 for k in range(n)]
            reg.append(-sum(beta * r_hat[k] * float(policy[row, k]) for k in range(n)))
        logit = beta * (rho_sum[0] - rho_sum[1])
        want = math.log1p(math.exp(-logit)) + alpha * _sigmoid(-logit) * (reg[0] + reg[1])
        assert abs(float(out.loss[i]) - want) < 1e-5, i


def test_no_gradient_flows_into_the_token_rewards_or_the_sequence_weight():
    """d L/d log π_θ(y_t) = ∓β·σ(−logit) (DPO, − on chosen tokens) − α·w·β·r̂_t (the regulariser, w and r̂
    constants); the variant log-probs get no gradient; the reference only DPO's."""
    beta, alpha = 0.5, 0.5
    policy, reference = (x.clone().requires_grad_() for x in (POLICY, REFERENCE))
    better, worse = (x.clone().requires_grad_() for x in (BETTER_LOGPS, WORSE_LOGPS))
    stats = TokenStats(policy * MASK, reference * MASK, response_mask=MASK,
                       variant_logps={BETTER: better, WORSE: worse})
    TREG(beta=beta, alpha=alpha)(stats).loss.sum().backward()
    assert better.grad is None and worse.grad is None
    w = _sigmoid(0.2)  # σ(−logit), logit = −0.2
    side = torch.tensor([[-1.0], [1.0]])  # ∂L_DPO/∂ρ: −β·σ(−logit) on chosen tokens, +β·σ(−logit) on rejected
    r_hat = torch.tensor([[0.2310586, -0.1224593, 0.0], [-0.2310586, 0.0, 0.2310586]])
    assert_close(policy.grad, (side * beta * w - alpha * w * beta * r_hat) * MASK, atol=1e-6, rtol=0)
    assert_close(reference.grad, -side * beta * w * MASK, atol=1e-6, rtol=0)


def test_treg_options_are_checked():
    with pytest.raises(ConfigError, match="alpha must be >= 0"):
        TREG(alpha=-0.1)
    with pytest.raises(ConfigError, match="scorer must be one of reference, policy.*Fix"):
        TREG(scorer="oracle")
    with pytest.raises(ConfigError, match="are the same"):
        TREG(worse_template=TREG().better_template)
    assert TREG().alpha == 0.25 and TREG().beta == 0.1 and TREG.needs_reference
    assert declared_scorers(TREG(), None) == {BETTER: "reference", WORSE: "reference"}
    assert declared_scorers(TREG(scorer="policy")) == {BETTER: "policy", WORSE: "policy"}


# ---- which model scores the variants -------------------------------------------------------------------------------
def test_the_variants_are_scored_by_the_reference_or_the_policy_and_lora_disables_the_adapters(tiny_model_dir,
                                                                                                tiny_tokenizer):
    """The module's scorer: its reference (default), its policy (scorer: policy), and with LoRA (no second copy)
    the policy inside disable_adapter(): after the adapters moved, that scores as the base model, the policy not."""
    from sparsepo_lightning.distribution_step import variant_logps, variant_scorer
    from sparsepo_lightning.module import PreferenceModule

    module = PreferenceModule(tiny_model_dir, objective=TREG())
    assert variant_scorer(module, "reference") == (module.reference, None)
    assert variant_scorer(module, "policy") == (module._causal_lm, None)
    pytest.importorskip("peft")
    lora = PreferenceModule(tiny_model_dir, objective=TREG(), lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                                                    "target_modules": ["q_proj", "v_proj"]})
    assert lora.reference is None
    with torch.no_grad():
        for name, param in lora.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    features = [tokenize_pair(PreferencePair("review: good", " a fine film", " bad"), tiny_tokenizer, max_length=64,
                              max_prompt_length=32, prompt_variants=TREG().prompt_variants())]
    for f in features:
        f.pop("variant_prompt_truncated")
    batch = collate_pairs(features, tiny_tokenizer.pad_token_id)
    names = TREG().prompt_variants()

    def score(scorer):
        model, context = variant_scorer(lora, scorer)
        return variant_logps(model, batch, names, 8, context)

    scored = {scorer: score(scorer) for scorer in ("reference", "policy")}  # policy second: the adapters are back on
    want = variant_logps(PreferenceModule(tiny_model_dir, objective=TREG()).reference, batch, names, 8)
    for name in (BETTER, WORSE):
        assert_close(scored["reference"][name], want[name])
        assert not torch.allclose(scored["policy"][name], want[name])


def test_a_reference_scorer_without_a_reference_is_refused():
    from types import SimpleNamespace

    from sparsepo_lightning.distribution_step import variant_scorer

    module = SimpleNamespace(reference=None, uses_adapter_reference=False, objective=TREG(), _causal_lm=None)
    with pytest.raises(ConfigError, match="scored by the reference, but TREG loads none.*Fix: scorer: policy"):
        variant_scorer(module, "reference")


# ---- training through the CLI (tiny recipe) ------------------------------------------------------------------------
@pytest.mark.parametrize("layout, scorer", [("padded", "reference"), ("packed", "reference"), ("padded", "policy")])
def test_treg_trains_the_tiny_recipe_and_its_step_is_the_naive_one(layout, scorer, tiny_model_dir, pairs_file,
                                                                   tmp_path, monkeypatch):
    """2 steps through `sparsepo fit` with configs/methods/treg.yaml, in both layouts (packed: each variant packed on
    its own, its prompt the shared prefix); the data module adds T-REG's prompts by itself (named in the data report);
    the last (validation) step's variant log-probs are the scorer's (the reference by default; after 2 steps at
    lr 1e-3 the policy's differ) on the padded variant rows from full logits, and its loss the T-REG loss of
    full-logit statistics."""
    from tests.test_methods_fit import _fit

    monkeypatch.chdir(ROOT)
    cli = _fit("treg", tiny_model_dir, tiny_model_dir, pairs_file, tmp_path, "--data.layout", layout,
               "--model.objective.init_args.scorer", scorer)
    module = cli.model
    assert cli.trainer.global_step == 2
    assert module.objective.scorer == scorer and module.objective.alpha == 0.25
    assert cli.datamodule.prompt_variants == module.objective.prompt_variants()
    assert "prompt variants: treg_better, treg_worse" in cli.datamodule.report["train"].summary()
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["train/treg/token_reward_chosen"])
    assert all(torch.isfinite(metrics[f"train/treg/{name}"]) for name in ("sequence_weight", "regulariser"))

    record = module.last_step
    assert record.stage == "val"
    batch = record.batch
    labels, mask = batch.shifted_labels()
    assert all((rows.packed is not None) == (layout == "packed") for rows in batch.prompt_variants.values())

    def label_logps(model, rows):
        row_labels, row_mask = rows.shifted_labels()
        logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, row_labels[..., None]).squeeze(-1)[row_mask]

    def scored(model):
        return {name: torch.zeros(mask.shape).masked_scatter(mask, label_logps(model, rows))
                for name, rows in batch.prompt_variants.items()}

    with torch.no_grad():
        by_reference, by_policy = scored(module.reference), scored(module.policy)
        policy, reference = (torch.zeros(mask.shape).masked_scatter(mask, label_logps(model, batch))
                             for model in (module.policy, module.reference))
    variants = by_reference if scorer == "reference" else by_policy
    other = by_policy if scorer == "reference" else by_reference
    for name in (BETTER, WORSE):
        assert_close(record.stats.variant_logps[name], variants[name], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(record.stats.variant_logps[name], other[name], rtol=1e-4, atol=1e-5)
    naive = TREG(beta=0.1, alpha=0.25)(TokenStats(policy, reference, response_mask=mask, variant_logps=variants))
    assert_close(record.out.loss, naive.loss, rtol=1e-4, atol=1e-5)
