"""The sentiment study: its plan, the driver end to end on a tiny model (resumable), and the report from logs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sparsepo_lightning.study import driver, report
from sparsepo_lightning.study.plan import METHODS, Paths, Run, StudySettings, config_key, plan, training_config

ROOT = Path(__file__).resolve().parents[1]


def test_plan_runs_every_method_at_every_beta_and_the_seeded_methods_at_every_seed():
    settings = StudySettings(betas=(0.1, 0.3, 0.8), seeds=(0, 1))
    runs = plan(settings)
    assert len(runs) == len(METHODS) * 3 + sum(m.all_seeds for m in METHODS.values()) * 3
    assert len({r.name for r in runs}) == len(runs)
    assert runs[0].beta == 0.3  # the middle beta first
    for r in runs:
        if METHODS[r.method].matches:
            source = runs.index(Run(METHODS[r.method].matches, r.beta, r.seed))
            assert source < runs.index(r)
    seeds = {m for m, method in METHODS.items() if method.all_seeds}
    assert seeds >= {"dpo", "tdpo1", "sparsepo_common", "random"}


def test_runs_of_one_seed_share_data_order_model_and_steps_and_keys_follow_the_config(tmp_path):
    settings, paths = StudySettings(), Paths(tmp_path, tmp_path / "work")
    configs = [training_config(settings, paths, Run(m, 0.3, 0), {"keep_rate": 0.5, "value": 1.0}) for m in METHODS]
    for c in configs:
        assert c["data"] == configs[0]["data"] and c["trainer"] == configs[0]["trainer"]
        assert c["model"]["model"] == "smollm2-135m" and c["seed_everything"] == 0
    keys = {config_key(c) for c in configs}
    assert len(keys) == len(configs)
    assert config_key(configs[0]) == config_key(json.loads(json.dumps(configs[0])))
    other = training_config(settings, paths, Run("dpo", 0.8, 0))
    assert config_key(other) != config_key(configs[0])


def test_every_method_config_parses_with_the_cli(tmp_path, monkeypatch, capsys):
    import yaml

    from sparsepo_lightning.cli import run as cli

    monkeypatch.chdir(ROOT)
    settings, paths = StudySettings(), Paths(tmp_path, tmp_path / "work")
    for method in METHODS:
        config = training_config(settings, paths, Run(method, 0.3, 1), {"keep_rate": 0.4, "value": 1.2})
        path = tmp_path / f"{method}.yaml"
        path.write_text(yaml.safe_dump(config))
        with pytest.raises(SystemExit) as info:
            cli(["fit", "--config", str(path), "--print_config"])
        assert info.value.code in (0, None), method
        assert "class_path" in capsys.readouterr().out


def test_matched_masks_from_a_learned_run():
    metrics = {"train": {"train/masks/sparsity_reward_chosen": [[0, 20.0], [1, 40.0]],
                         "train/masks/sparsity_reward_rejected": [[0, 40.0], [1, 60.0]],
                         "train/masks/mean_reward": [[0, 0.5], [1, 0.3]]}}
    # sparsity 40 % -> keep 0.6; mean mask 0.4 over all tokens -> 0.4 / 0.6 on the kept ones
    assert driver.matched_masks(metrics) == {"keep_rate": 0.6, "value": round(0.4 / 0.6, 4)}


def test_reviews_are_read_from_the_package_csv_layout(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text('text,label,source\n"Great, fun<br />film",1,imdb\nmeh,0,rotten_tomatoes\nBad movie.,0,imdb\n')
    assert driver.read_reviews_csv(path) == ["Great, fun<br />film", "Bad movie."]
    (tmp_path / "bad.csv").write_text("review,label\nx,1\n")
    with pytest.raises(ValueError, match=r"bad.csv: no column source, text"):
        driver.read_reviews_csv(tmp_path / "bad.csv")


class LengthScorer:
    """A deterministic stand-in for VADER on random-model text: longer continuations score higher."""

    def __call__(self, texts):
        return [len(t) / 100 for t in texts]


@pytest.mark.slow
def test_driver_runs_trains_evaluates_resumes_and_reports(cli_zygote, tiny_model_dir, tmp_path, monkeypatch):
    from sparsepo_lightning.builders import sentiment

    # each `sparsepo` command of the driver is forked from the zygote instead of starting Python
    monkeypatch.setattr(driver, "subprocess", SimpleNamespace(run=cli_zygote.subprocess_run, STDOUT=subprocess.STDOUT))

    reviews = [f"Review number {i} says the film was {w} and more" for i, w in enumerate(["fine", "bad", "great",
                                                                                          "dull", "odd", "long"] * 2)]
    monkeypatch.setattr(driver, "review_texts", lambda: reviews)
    monkeypatch.setattr(sentiment, "make_scorer", lambda *a, **k: LengthScorer())
    monkeypatch.chdir(ROOT)
    settings = StudySettings(model=tiny_model_dir, train_prompts=8, heldout_prompts=4, min_words=3, max_words=5,
                             samples_per_prompt=3, max_new_tokens=6, steps=2, batch_size=2, betas=(0.5,),
                             seeds=(0,), eval_samples=2, max_length=32, max_prompt_length=16)
    paths = Paths(tmp_path / "out", tmp_path / "work")
    only = ["sparsepo_common", "random"]  # a masked run and its matched control (DPO runs the same driver path)
    done = driver.run_study(settings, paths, only=only)
    assert done == ["sparsepo_common_b0.5_s0", "random_b0.5_s0"]
    for run_dir in (paths.out / "runs").glob("*_s0-*"):
        assert {p.name for p in run_dir.iterdir()} >= {"config.json", "metrics.json", "eval.json"}
        assert not (paths.work / "checkpoints" / run_dir.name.rsplit("-", 1)[1]).exists()  # deleted after eval
    common = next((paths.out / "runs").glob("sparsepo_common_*"))
    assert (common / "masks.json").is_file()
    metrics = json.loads((common / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["initial_masks"]["mask_mean"] == pytest.approx(1.0, abs=1e-6)
    random_config = json.loads(next((paths.out / "runs").glob("random_*")).joinpath("config.json").read_text())
    assert random_config["model"]["masker"]["init_args"] == {**driver.matched_masks(metrics), "seed": 0}
    assert driver.run_study(settings, paths, only=only) == []  # a second sitting finds everything done
    readme = report.write_report(paths.out)
    text = readme.read_text()
    assert "Partial study: 2 of" in text and "| SparsePO common (start 1) | 0.5 | 0 | 2 |" in text
    assert (paths.out / "frontier.png").is_file() and (paths.out / "sparsity.png").is_file()
    report.write_report(paths.out)
    assert readme.read_text() == text  # regenerated identically from the logs


def _fake_logs(out: Path) -> None:
    rng = np.random.default_rng(0)
    prompts = 30
    (out / "runs").mkdir(parents=True)
    (out / "study.json").write_text(json.dumps({"settings": {"betas": [0.1, 0.8], "seeds": [0]},
                                                "hardware": "test"}))
    (out / "data.json").write_text(json.dumps({"train": {"prompts": 10, "pairs": 9}}))
    reference = {"reward_mean": 0.1, "reward_sem": 0.01, "kl_mean": 0.0, "kl_sem": 0.0,
                 "reward_per_prompt": rng.normal(0.1, 0.1, prompts).round(4).tolist(),
                 "kl_per_prompt": [0.0] * prompts, "second_scorer": "textblob"}
    reference["second_reward_per_prompt"] = (np.array(reference["reward_per_prompt"]) / 2).round(4).tolist()
    (out / "runs" / "reference-x").mkdir()
    (out / "runs" / "reference-x" / "eval.json").write_text(json.dumps(reference))
    tokens = [" good", " film", " bad", " the", " great", " awful"] * 4
    for i, method in enumerate(("dpo", "sparsepo_common", "random")):
        for beta in (0.1, 0.8):
            kl = rng.normal(beta * 2, 0.1, prompts).clip(0)
            reward = np.array(reference["reward_per_prompt"]) + beta * (0.2 + 0.1 * i) + rng.normal(0, 0.05, prompts)
            run_dir = out / "runs" / f"{method}_b{beta:g}_s0-k{i}"
            run_dir.mkdir()
            train = {"train/loss": [[0, 0.69], [1, 0.6]], "train/masks/mean_reward": [[0, 1.0], [1, 0.9]]}
            if method != "dpo":
                train |= {f"train/masks/sparsity_{k}_{s}": [[0, 0.0], [1, 30.0 + 10 * beta]] for k in ("reward", "kl")
                          for s in ("chosen", "rejected")}
            metrics = {"name": run_dir.name.split("-")[0], "method": method, "beta": beta, "seed": 0, "steps": 2,
                       "wall_seconds": 10.0, "final_val": {"loss": 0.6, "accuracy": 0.7, "margin": 0.2},
                       "initial_masks": None, "train": train}
            (run_dir / "metrics.json").write_text(json.dumps(metrics))
            (run_dir / "config.json").write_text(json.dumps({"model": {}}))
            (run_dir / "eval.json").write_text(json.dumps({
                "reward_mean": float(reward.mean()), "reward_sem": 0.01, "kl_mean": float(kl.mean()), "kl_sem": 0.01,
                "wall_seconds": 5.0, "reward_per_prompt": reward.tolist(), "kl_per_prompt": kl.tolist(),
                "second_scorer": "textblob", "second_reward_per_prompt": (reward / 2).tolist()}))
            if method == "sparsepo_common":
                weights = [1.0 if t.strip() in ("good", "great", "bad", "awful") else 0.1 for t in tokens]
                side = {"tokens": tokens, "reward": weights, "kl": None}
                (run_dir / "masks.json").write_text(json.dumps({"global_step": 2, "common": True, "pairs": [
                    {"prompt": "p", "chosen": side, "rejected": side}] * 3}))


def test_report_from_logs_has_every_section_and_is_reproducible(tmp_path):
    _fake_logs(tmp_path)
    readme = report.write_report(tmp_path)
    text = readme.read_text()
    for heading in ("## Conclusion", "## Reward–KL frontier", "## Mask sparsity during training",
                    "## Where the learned masks put their weight", "## All runs", "paper's scale"):
        assert heading in text
    assert "SparsePO common − Random mask (matched)" in text and "SparsePO common − DPO" in text
    assert "higher frontier score than DPO" in text  # built in: sparsepo_common is 0.1*beta above dpo
    assert "## Under a second scorer (textblob)" in text  # half of every reward: the same verdicts
    assert "- Under textblob the verdict against DPO holds" in text
    # the learned method's last logged sparsity over its runs (β 0.1: 31 %, β 0.8: 38 %); random is not learned
    assert "last training step: SparsePO common (start 1) 31.0–38.0 % zeros, mean weight 0.90 (2 runs)." in text
    planned = len(plan(StudySettings(betas=(0.1, 0.8), seeds=(0,))))
    hours = planned * (10.0 + 5.0) / 3600  # every fake run: 10 s of training, 5 s of evaluation
    assert (f"- Cost: a run takes 0.2 min of training and 0.1 min of evaluation (medians over 6 runs): about "
            f"{hours:.1f} h for the {planned} runs") in text
    # sentiment words carry weight 1, others 0.1: a strong rank correlation with |valence|, p at its minimum
    row = next(line for line in text.splitlines() if line.startswith("| sparsepo_common_b0.1_s0 | reward | chosen"))
    rho_abs, p_abs = float(row.split("|")[5]), float(row.split("|")[6])
    assert rho_abs > 0.8 and p_abs < 0.01  # ties among the weights keep it below 1
    assert "highest: `' awful'`" in text or "highest: `' bad'`" in text
    for figure in ("frontier.png", "sparsity.png", "heatmap_0.png", "heatmap_2.png"):
        assert (tmp_path / figure).stat().st_size > 1000
    assert report.write_report(tmp_path).read_text() == text


def test_sparsepo_study_plan_lists_every_run(cli_zygote, tmp_path):
    done = cli_zygote.run("study", "sentiment", "plan", "--out", str(tmp_path / "out"), "--work",
                          str(tmp_path / "work"), "--betas", "0.5", "--seeds", "3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(METHODS)
    assert any(line.startswith("dpo_b0.5_s3 ") and line.endswith("to do") for line in lines)
    assert any(line.startswith("random_b0.5_s3 ") and "waits for its matched run" in line for line in lines)


def test_textblob_scorer_and_rescore_add_the_second_scores(tmp_path):
    from sparsepo_lightning.builders.scorers import make_scorer

    great, dull, neutral = make_scorer("textblob")([" a great, wonderful film", " a terrible, boring film", " it"])
    assert great > 0.5 and dull < -0.5 and neutral == 0.0
    paths = Paths(tmp_path / "out", tmp_path / "work")
    run_dir, eval_dir = paths.out / "runs" / "dpo_b0.1_s0-abc", paths.work / "eval" / "dpo_b0.1_s0-abc"
    run_dir.mkdir(parents=True)
    eval_dir.mkdir(parents=True)
    (run_dir / "eval.json").write_text(json.dumps({"reward_mean": 0.1}))
    samples = [{"prompt": "p1", "completion": " a great film"}, {"prompt": "p1", "completion": " it"},
               {"prompt": "p2", "completion": " a terrible film"}, {"prompt": "p2", "completion": " a terrible film"}]
    (eval_dir / "sentiment_samples.jsonl").write_text("\n".join(json.dumps(x) for x in samples) + "\n")
    assert driver.rescore(paths) == ["dpo_b0.1_s0-abc"]
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["reward_mean"] == 0.1 and result["second_scorer"] == "textblob"
    assert result["second_reward_per_prompt"] == [pytest.approx(great_of(" a great film") / 2, abs=1e-6),
                                                  pytest.approx(great_of(" a terrible film"), abs=1e-6)]
    assert driver.rescore(paths) == []  # done once


def great_of(text):
    from sparsepo_lightning.builders.scorers import TextBlobScorer

    return TextBlobScorer()([text])[0]


def test_the_committed_report_is_what_its_committed_logs_regenerate(tmp_path):
    """`make study-report` on the committed logs alone writes the committed README.md, to the character.

    Only evaluated runs are committed; a run the study is making in this work tree (no ``eval.json`` yet) is left out.
    """
    committed = ROOT / "reports" / "sentiment"
    for name in ("study.json", "data.json"):
        (tmp_path / name).write_bytes((committed / name).read_bytes())
    for run_dir in (committed / "runs").iterdir():
        if (run_dir / "eval.json").is_file():
            shutil.copytree(run_dir, tmp_path / "runs" / run_dir.name)
    regenerated = report.write_report(tmp_path).read_text(encoding="utf-8")
    assert regenerated == (committed / "README.md").read_text(encoding="utf-8"), \
        "reports/sentiment/README.md is stale: run `make study-report` and commit it"
