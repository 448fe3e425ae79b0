"""The packed layout (``data.layout: packed``): collation by hand, exactness against the padded layout in float32
(hidden states, per-token statistics, masks, losses, one optimizer step, gradient accumulation) for Llama, GPT-2
(learned positions), GPT-NeoX (partial rotary) and LoRA, and the start-up check of models that cannot take it.
DDP and FSDP2 on 2 processes: ``tests/test_distributed.py`` (``*_packed`` modes)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch.testing import assert_close

from sparsepo_lightning.checks import check_packed_layout
from sparsepo_lightning.data import PreferenceDataModule
from sparsepo_lightning.data.batching import log_budget_batches
from sparsepo_lightning.data.collate_packed import collate_packed, packed_cost, padded_cost, segment_length
from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.logprobs import final_hidden_states
from sparsepo_lightning.masks import ActivationMasker, LearnedMasker
from sparsepo_lightning.module import PreferenceModule
from sparsepo_lightning.objectives import DPO, TDPO2, SparsePO
from sparsepo_lightning.packing import CHOSEN, REJECTED, SHARED
from tests.tiny_models import tiny_gpt2, tiny_gptj, tiny_llama, tiny_neox

FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "neox": tiny_neox, "gptj": tiny_gptj}


def _pair(prompt, chosen, rejected):
    return {"chosen_input_ids": prompt + chosen, "chosen_labels": [-100] * len(prompt) + chosen,
            "rejected_input_ids": prompt + rejected, "rejected_labels": [-100] * len(prompt) + rejected}


def test_collate_packed_by_hand():
    batch = collate_packed([_pair([5, 6], [7, 8], [9]), _pair([4], [3], [3, 10, 11])], pad_token_id=0)
    packed = batch.packed
    # pair 0: shared [5, 6], chosen [7, 8], rejected [9]; pair 1: rejected starts like chosen, so shares [4, 3]
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 4, 3, 10, 11]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 2, 3]]
    assert packed.segment_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1]]
    assert packed.branch.tolist() == [[SHARED, SHARED, CHOSEN, CHOSEN, REJECTED, SHARED, SHARED, REJECTED,
                                       REJECTED]]
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [4, 3, 0, 0], [5, 6, 9, 0], [4, 3, 10, 11]]
    assert packed.index.tolist() == [[0, 1, 2, 3], [5, 6, 0, 0], [0, 1, 4, 0], [5, 6, 7, 8]]
    gathered = packed.input_ids.reshape(-1)[packed.index] * batch.attention_mask
    assert torch.equal(gathered, batch.input_ids * batch.attention_mask)
    mask = packed.attention_mask("sdpa")[0, 0]
    assert mask[4].tolist() == [True, True, False, False, True, False, False, False, False]  # rejected: not 7, 8
    assert mask[3].tolist() == [True, True, True, True, False, False, False, False, False]
    assert mask[7].tolist() == [False] * 5 + [True, True, True, False]  # pair 1 only
    eager = packed.attention_mask("eager")[0, 0]
    assert torch.equal(eager == 0, mask) and eager.min() == torch.finfo(torch.float32).min
    assert padded_cost([_pair([5, 6], [7, 8], [9])]) == 8 and segment_length(_pair([5, 6], [7, 8], [9])) == 5
    assert packed_cost([_pair([5, 6], [7, 8], [9]), _pair([4], [3], [3, 10, 11])]) == 9
    assert packed_cost([_pair([5, 6], [7, 8], [9]), _pair([4], [3], [3, 10, 11])], pack_length=6) == 10  # 2 x 5


def test_pack_length_rows_first_fit_and_padding_sees_itself():
    pairs = [_pair([1, 2], [3], [4]), _pair([1], [5, 6, 7], [8]), _pair([2], [3], [4])]  # segments 4, 5, 3
    packed = collate_packed(pairs, pad_token_id=0, pack_length=7).packed
    assert packed.segment_ids.tolist() == [[0, 0, 0, 0, 2, 2, 2], [1, 1, 1, 1, 1, -1, -1]]
    mask = packed.attention_mask("sdpa")[:, 0]
    assert mask[1, 6].tolist() == [False] * 6 + [True]  # padding attends to itself only: no empty softmax row


def _features(tokenizer, pairs_file, n=6):
    dm = PreferenceDataModule(tokenizer="unused", train_file=pairs_file, max_length=32, max_prompt_length=16)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    return dm.datasets["train"][:n]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("pack_length", [None, 40])
def test_hidden_states_equal_padded(family, implementation, pack_length, tiny_tokenizer, pairs_file):
    features = _features(tiny_tokenizer, pairs_file)
    batch = collate_packed(features, tiny_tokenizer.pad_token_id, pack_length=pack_length)
    model = FAMILIES[family](vocab=len(tiny_tokenizer))
    model.config._attn_implementation = implementation
    with torch.no_grad():
        last, layers = final_hidden_states(model, batch.input_ids, batch.attention_mask, all_layers=True)
        packed_last, packed_layers = final_hidden_states(model, batch.input_ids, batch.attention_mask,
                                                         all_layers=True, packed=batch.packed)
    keep = batch.attention_mask.bool()[..., None]
    assert batch.packed.num_tokens < batch.input_ids.numel()
    assert_close(packed_last, last * keep, rtol=0, atol=1e-5)
    for a, b in zip(packed_layers, layers, strict=True):
        assert_close(a, b * keep, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def family_dirs(tiny_tokenizer, tiny_model_dir, tmp_path_factory):
    dirs = {"llama": tiny_model_dir}
    for family in ("gpt2", "neox", "gptj"):
        path = tmp_path_factory.mktemp(family)
        model = FAMILIES[family](vocab=len(tiny_tokenizer))
        model.config.pad_token_id = tiny_tokenizer.pad_token_id
        model.save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        dirs[family] = str(path)
    return dirs


def _step(model_dir, batch, **options):
    """Statistics, masks and loss of one training step, then one SGD step; returns them and the new weights."""
    seed_everything(0)
    module = PreferenceModule(model=model_dir, optimizer=torch.optim.SGD, lr=0.5, warmup_ratio=0.0, **options)
    module.configure_model()  # activation checkpointing wraps the blocks here
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
    before = {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}
    loss = module._shared_step(batch, "train")
    loss.backward()
    optimizer.step()
    after = {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}
    return loss.detach(), module.last_step, (before, after)


ARMS = {
    "sparsepo_learned_common": dict(objective=SparsePO(l1_reward=0.01, l1_kl=0.01), masker=LearnedMasker()),
    "sparsepo_learned_independent": dict(objective=SparsePO(l1_reward=0.01, l1_kl=0.01),
                                         masker=LearnedMasker(independent=True, init="released")),
    "mapo_activation": dict(objective=SparsePO(), masker=ActivationMasker()),
    "tdpo2": dict(objective=TDPO2()),
    "sparsepo_activation_checkpointing": dict(objective=SparsePO(), masker=LearnedMasker(),
                                              activation_checkpointing=True),
    "dpo": dict(objective=DPO()),
}


@pytest.mark.parametrize(("family", "arm"), [("llama", arm) for arm in ARMS]
                         + [("gpt2", "sparsepo_learned_common"), ("neox", "mapo_activation"),
                            ("gptj", "sparsepo_learned_independent"),
                            ("llama", "lora")])
def test_step_equals_padded(family, arm, family_dirs, tiny_tokenizer, pairs_file):
    """Per-token log-probs and KL, masks, loss and the weights after one SGD step (policy and mask network) equal
    the padded layout's in float32."""
    options = dict(ARMS.get(arm, {}))
    if arm == "lora":
        options = dict(objective=SparsePO(), masker=LearnedMasker(),
                       lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    features = _features(tiny_tokenizer, pairs_file)
    padded = collate_packed(features, tiny_tokenizer.pad_token_id)
    packed = collate_packed(features, tiny_tokenizer.pad_token_id)
    padded.packed = None
    loss_a, rec_a, (before, weights_a) = _step(family_dirs[family], padded, **copy.deepcopy(options))
    loss_b, rec_b, (_, weights_b) = _step(family_dirs[family], packed, **copy.deepcopy(options))
    mask = rec_a.stats.response_mask
    assert torch.equal(mask, rec_b.stats.response_mask)
    for name in ("policy_logps", "reference_logps", "kl"):
        a, b = getattr(rec_a.stats, name), getattr(rec_b.stats, name)
        if a is not None:
            assert_close(b, a, rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    if rec_a.masks is not None:
        assert_close(rec_b.masks.reward, rec_a.masks.reward, rtol=0, atol=1e-5)
        assert_close(rec_b.masks.kl, rec_a.masks.kl, rtol=0, atol=1e-5)
    assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name, value in weights_a.items():
        assert_close(weights_b[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert max((weights_a[k] - before[k]).abs().max().item() for k in before) > 1e-5  # the step moved weights


def _fit_weights(model_dir, pairs_file, layout, tmp_path, **data_options):
    seed_everything(0)
    module = PreferenceModule(model=model_dir, objective=SparsePO(l1_reward=0.01, l1_kl=0.01),
                              masker=LearnedMasker(), optimizer=torch.optim.SGD, lr=0.5, warmup_ratio=0.0,
                              schedule="constant")
    data = PreferenceDataModule(tokenizer=model_dir, train_file=pairs_file, batch_size=2, max_length=32,
                                max_prompt_length=16, layout=layout, **data_options)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, accumulate_grad_batches=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path)
    before = {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}
    trainer.fit(module, datamodule=data)
    after = {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}
    return before, after


def test_gradient_accumulation_fit_equals_padded(tiny_model_dir, pairs_file, tmp_path):
    """Two optimizer steps of two accumulated micro-batches each, through ``Trainer.fit``."""
    before, padded = _fit_weights(tiny_model_dir, pairs_file, "padded", tmp_path / "a")
    _, packed = _fit_weights(tiny_model_dir, pairs_file, "packed", tmp_path / "b", pack_length=48)
    assert max((padded[k] - before[k]).abs().max().item() for k in before) > 1e-4
    for name, value in padded.items():
        assert_close(packed[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_models_that_cannot_take_the_layout_fail_at_start(tiny_model_dir):
    model = tiny_llama()
    assert check_packed_layout(model, None, None) is True
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match=r"policy uses 'flash_attention_2'.*data.layout: padded"):
        check_packed_layout(model, None, None)
    model = tiny_llama()
    forward = model.model.forward
    model.model.forward = lambda *a, position_ids=None, **k: forward(*a, **k)  # ignores position ids
    with pytest.raises(ConfigError, match=r"reference \(LlamaForCausalLM\) gives different hidden states"):
        check_packed_layout(tiny_llama(), model, None)


def test_layout_options_are_checked(tiny_model_dir):
    from sparsepo_lightning.data.unpaired import UnpairedDataModule

    with pytest.raises(ConfigError, match="unpaired examples have nothing to share"):
        UnpairedDataModule(tokenizer=tiny_model_dir, train_file="x.jsonl", layout="packed")
    with pytest.raises(ConfigError, match=r"data.max_tokens=40 is below 2 × data.max_length \(64\)"):
        PreferenceDataModule(tokenizer=tiny_model_dir, train_file="x.jsonl", max_length=32, max_prompt_length=8,
                             max_tokens=40)
    with pytest.raises(ConfigError, match="data.pack_length=16: needs data.layout: packed"):
        PreferenceDataModule(tokenizer=tiny_model_dir, train_file="x.jsonl", pack_length=16)
    with pytest.raises(ConfigError, match="data.layout='stacked'"):
        PreferenceDataModule(tokenizer=tiny_model_dir, train_file="x.jsonl", layout="stacked")


# ---- token-budget micro-batches (data.max_tokens) -------------------------------------------------------------
def _lengths_pairs(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        p, c, r = (int(x) for x in torch.randint(1, 12, (3,), generator=g))
        pairs.append(_pair(list(range(3, 3 + p)), [50] * c, [60] * r))
    return pairs


@pytest.mark.parametrize(("layout", "pack_length"), [("padded", None), ("packed", None), ("packed", 24)])
def test_budget_batches_stay_within_budget_and_are_maximal(layout, pack_length):
    from sparsepo_lightning.data.batching import budget_batches, seeded_order

    pairs, budget = _lengths_pairs(), 128
    cost = padded_cost if layout == "padded" else functools.partial(packed_cost, pack_length=pack_length)
    order = seeded_order(len(pairs), 3)
    batches = budget_batches(pairs, budget, layout, pack_length, order)
    assert [i for b in batches for i in b] == order  # every pair once, in the seeded order
    for b, following in zip(batches, [*batches[1:], None], strict=True):
        assert cost([pairs[i] for i in b]) <= budget
        if following is not None:  # greedy: the next pair would not have fitted
            assert cost([pairs[i] for i in [*b, following[0]]]) > budget
    assert len(batches) < len(pairs) / 2  # several pairs per micro-batch


def test_batch_order_sampler_reshuffles_per_pass_deals_ranks_and_skips():
    from sparsepo_lightning.data.batching import BatchList, BatchOrderSampler

    batches = BatchList([], [[i] for i in range(5)], collate=list)
    sampler = BatchOrderSampler(batches, seed=7, shuffle=True)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == sorted(second) == list(range(5)) and first != second
    assert list(BatchOrderSampler(batches, seed=7, shuffle=True, passes=1)) == second  # pass k: seed + k
    assert list(BatchOrderSampler(batches, seed=7, shuffle=True, passes=1, skip=2)) == second[2:]
    assert len(BatchOrderSampler(batches, seed=7, shuffle=True, passes=1, skip=2)) == 5
    ranks = []
    for rank in range(2):
        sampler = BatchOrderSampler(batches, seed=7, shuffle=False)
        sampler.num_replicas, sampler.rank = 2, rank
        ranks.append(list(sampler))
    assert ranks == [[0, 2, 4], [1, 3, 0]]  # padded to 6 by repeating the first, as DistributedSampler does
    assert len(sampler) == 3


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_data_module_token_budget_batches_and_exact_resume(layout, tiny_tokenizer, pairs_file):
    def module():
        dm = PreferenceDataModule(tokenizer="unused", train_file=pairs_file, val_file=pairs_file, max_length=32,
                                  max_prompt_length=16, layout=layout, max_tokens=96)
        dm.tokenizer = tiny_tokenizer
        dm.setup("fit")
        return dm

    dm = module()
    loader = dm.train_dataloader()
    message = log_budget_batches("train", layout, 96, None, loader.dataset)
    assert message.startswith(f"data (train): 16 pairs in {len(loader)} micro-batches of ")
    assert f"{layout} layout" in message
    batches = list(loader)
    sources = [dm.train_batch_sources(i) for i in range(len(batches))]
    assert sum(len(s) for s in sources) == 16 and len(batches) == len(loader)
    for batch, rows in zip(batches, sources, strict=True):
        assert batch.input_ids.shape[0] == 2 * len(rows)
        used = batch.packed.num_tokens if layout == "packed" else batch.input_ids.numel()
        assert used <= 96
        assert (batch.packed is not None) == (layout == "packed")
    second_pass = list(loader)  # the loader's second pass: order randperm(seed + 1)
    # resume inside the second pass after 2 micro-batches: the rest of that pass, in the same order
    resumed = module()
    resumed.load_state_dict({"train_passes": 2, "train_batches_done": 2, "train_pass_complete": False})
    rest = list(resumed.train_dataloader())
    assert len(rest) == len(second_pass) - 2
    for a, b in zip(rest, second_pass[2:], strict=True):
        assert torch.equal(a.input_ids, b.input_ids)
    val = list(dm.val_dataloader())
    assert sum(b.input_ids.shape[0] for b in val) == 32  # every validation pair once, in file order


@pytest.mark.parametrize("task", ["hh", "tldr"])
def test_long_prompt_recipes_train_packed_through_the_cli(task, tmp_path, monkeypatch):
    """The HH and TL;DR recipes set ``data.layout: packed``; their small variants train that way end to end (here on
    the tiny random Llama with the SmolLM2 tokenizer, 2 steps) with the mask heat-maps and statistics callbacks."""
    from pathlib import Path

    from sparsepo_lightning.cli import run

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    cli = run(["fit", "--config", f"configs/{task}/sparsepo_small.yaml", "--model.model", "tiny-random-llama",
               "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
               "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(tmp_path)])
    assert cli.datamodule.layout == "packed"
    assert cli.model.last_step.batch.packed is not None and cli.model._packed_checked
    assert cli.trainer.global_step == 2


def test_flex_attention_block_mask_equals_padded(tiny_tokenizer, pairs_file, monkeypatch):
    """``flex_attention`` gets the same rule as a ``BlockMask`` (its kernel skips masked blocks), through transformers'
    integration. The kernel runs eagerly here: what is ours is the rule, and inductor's CPU compile of the kernel
    (transformers compiles it on first use) took about 35 s of the suite. ``make gpu-check`` trains with the
    compiled kernel on CUDA."""
    from transformers.integrations import flex_attention as integration

    monkeypatch.setattr(integration.torch, "compile", lambda fn, *args, **kwargs: fn)
    monkeypatch.setattr(integration.WrappedFlexAttention, "_instance", None)  # a fresh singleton, dropped after
    features = _features(tiny_tokenizer, pairs_file, n=3)
    batch = collate_packed(features, tiny_tokenizer.pad_token_id)
    model = tiny_llama(vocab=len(tiny_tokenizer))
    with torch.no_grad():
        last, _ = final_hidden_states(model, batch.input_ids, batch.attention_mask)
        model.set_attn_implementation("flex_attention")
        assert check_packed_layout(model, None, None)
        packed, _ = final_hidden_states(model, batch.input_ids, batch.attention_mask, packed=batch.packed)
    assert_close(packed, last * batch.attention_mask.bool()[..., None], rtol=0, atol=1e-5)


def test_attn_implementation_option_reaches_every_model(tiny_model_dir):
    module = PreferenceModule(model=tiny_model_dir, attn_implementation="eager",
                              frozen_models={"other": tiny_model_dir}, objective=SparsePO(),
                              masker=_frozen_reader())
    implementations = {m.config._attn_implementation for m in (module.policy, module.reference,
                                                              module.frozen_models["other"])}
    assert implementations == {"eager"}
    with pytest.raises(ConfigError, match="model.attn_implementation='no_such_kernel'"):
        PreferenceModule(model=tiny_model_dir, attn_implementation="no_such_kernel")


def _frozen_reader():
    from sparsepo_lightning.methods.tisdpo import ContrastiveImportance

    return ContrastiveImportance(positive="other", negative="other")


@pytest.mark.parametrize("arm", ["aligndistil", "entropy"])
def test_full_distribution_statistics_equal_padded(arm, family_dirs, tiny_tokenizer, pairs_file):
    """Full-distribution statistics (distributions.py) in the packed layout: AlignDistil's divergence (its DPO and
    reverse-DPO models: a tiny GPT-2 and a tiny GPT-NeoX, so the teacher differs from the reference) and the policy's
    entropy for high-entropy selection equal the padded layout's, as do the loss and the weights after one step."""
    from sparsepo_lightning.methods import AlignDistil, HighEntropySelection
    from sparsepo_lightning.objectives import WeightedDPO

    options = {"aligndistil": dict(objective=AlignDistil(responses="both"),
                                   frozen_models={"dpo": family_dirs["gpt2"], "reverse_dpo": family_dirs["neox"]}),
               "entropy": dict(objective=WeightedDPO(), masker=HighEntropySelection(keep_ratio=0.5))}[arm]
    features = _features(tiny_tokenizer, pairs_file)
    padded = collate_packed(features, tiny_tokenizer.pad_token_id)
    packed = collate_packed(features, tiny_tokenizer.pad_token_id)
    padded.packed = None
    loss_a, rec_a, (_, weights_a) = _step(family_dirs["llama"], padded, **copy.deepcopy(options))
    loss_b, rec_b, (_, weights_b) = _step(family_dirs["llama"], packed, **copy.deepcopy(options))
    (name,) = rec_a.stats.distribution
    assert rec_a.stats.distribution[name][rec_a.stats.response_mask].abs().min() > 0  # a statistic that can differ
    assert_close(rec_b.stats.distribution[name], rec_a.stats.distribution[name], rtol=0, atol=1e-5)
    assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for key, value in weights_a.items():
        assert_close(weights_b[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
