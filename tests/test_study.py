"""The sentiment study: its plan, the driver end to end on a tiny model (resumable), and the report from logs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from sparsepo_lightning.study import driver, report
from sparsepo_lightning.study.machine import claim, held
from sparsepo_lightning.study.plan import Paths, Run, config_key, plan, training_config
from sparsepo_lightning.study.planfile import load_plan

ROOT = Path(__file__).resolve().parents[1]
FIRST = load_plan(ROOT / "configs" / "study" / "sentiment.yaml")
"""The first study's plan (42 runs, reports/sentiment)."""
METHODS = FIRST.arms


def test_plan_runs_every_method_at_every_beta_and_the_seeded_methods_at_every_seed():
    runs = plan(FIRST.with_settings(betas=(0.1, 0.3, 0.8), seeds=(0, 1)))
    assert len(runs) == len(METHODS) * 3 + sum(m.all_seeds for m in METHODS.values()) * 3
    assert len({r.name for r in runs}) == len(runs)
    assert runs[0].beta == 0.3  # the middle beta first
    for r in runs:
        if METHODS[r.method].matches:
            source = runs.index(Run(METHODS[r.method].matches, r.beta, r.seed))
            assert source < runs.index(r)
    seeds = {m for m, method in METHODS.items() if method.all_seeds}
    assert len(runs) == 42
    assert seeds >= {"dpo", "tdpo1", "sparsepo_common", "random"}


def test_runs_of_one_seed_share_data_order_model_and_steps_and_keys_follow_the_config(tmp_path):
    paths = Paths(tmp_path, tmp_path / "work")
    configs = [training_config(FIRST, paths, Run(m, 0.3, 0), {"keep_rate": 0.5, "value": 1.0}) for m in METHODS]
    for c in configs:
        assert c["data"] == configs[0]["data"] and c["trainer"] == configs[0]["trainer"]
        assert c["model"]["model"] == "smollm2-135m" and c["seed_everything"] == 0
    keys = {config_key(c) for c in configs}
    assert len(keys) == len(configs)
    assert config_key(configs[0]) == config_key(json.loads(json.dumps(configs[0])))
    other = training_config(FIRST, paths, Run("dpo", 0.8, 0))
    assert config_key(other) != config_key(configs[0])


def test_every_method_config_parses_with_the_cli(tmp_path, monkeypatch, capsys):
    import yaml

    from sparsepo_lightning.cli import run as cli

    monkeypatch.chdir(ROOT)
    paths = Paths(tmp_path, tmp_path / "work")
    for method in METHODS:
        config = training_config(FIRST, paths, Run(method, 0.3, 1), {"keep_rate": 0.4, "value": 1.2})
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


TINY = dict(model="", train_prompts=8, heldout_prompts=4, min_words=3, max_words=5, samples_per_prompt=3,
            max_new_tokens=6, steps=2, batch_size=2, betas=(0.5,), seeds=(0,), eval_samples=2, max_length=32,
            max_prompt_length=16)
"""Study settings for the tiny model (``model`` is set to its folder)."""


class LengthScorer:
    """A deterministic stand-in for VADER on random-model text: longer continuations score higher."""

    def __call__(self, texts):
        return [len(t) / 100 for t in texts]


def test_a_matched_arm_reads_the_measured_sparsity_of_its_source_run(tmp_path):
    """The first study's constant-mask arm (``matches: sparsepo_common``) copies that run's measured keep rate and
    mean kept weight, and waits for it."""
    paths = Paths(tmp_path / "out", tmp_path / "work")
    source = Run("sparsepo_common", 0.3, 1)
    with pytest.raises(RuntimeError, match="copies the measured sparsity of sparsepo_common_b0.3_s1"):
        driver.run_config(FIRST, paths, Run("random", 0.3, 1))
    metrics = {"train": {"train/masks/sparsity_reward_chosen": [[0, 0.0]], "train/masks/sparsity_reward_rejected":
                         [[0, 0.0]], "train/masks/mean_reward": [[0, 2.5]]}}
    run_dir = paths.run_dir(source, config_key(training_config(FIRST, paths, source)))
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    config = driver.run_config(FIRST, paths, Run("random", 0.3, 1))
    assert config["model"]["masker"]["init_args"] == {"keep_rate": 1.0, "value": 2.5, "seed": 1}  # TDPO1 at β × 2.5


USER_ARMS = {
    "my_rule": {"label": "My rule", "objective": "WeightedDPO",
                "masker": "sparsepo_lightning.methods.confpo.LowConfidenceSelection"},
    "my_rule_permuted": {"label": "My rule, permuted", "control_of": "my_rule", "control": "PermutedControl"},
}
"""A user's own arm and its control, added to a copy of the shipped plan as the docs show (docs/studies.md)."""


@pytest.mark.slow
def test_a_users_arm_added_to_the_plan_runs_through_the_driver_resumes_and_reports(cli_zygote, tiny_model_dir,
                                                                                   tmp_path, monkeypatch):
    import yaml

    from sparsepo_lightning.builders import sentiment
    from sparsepo_lightning.study import machine
    from sparsepo_lightning.study.planfile import load_plan

    # each `sparsepo` command of the driver is forked from the zygote instead of starting Python
    monkeypatch.setattr(machine, "subprocess", SimpleNamespace(run=cli_zygote.subprocess_run, STDOUT=subprocess.STDOUT))
    reviews = [f"Review number {i} says the film was {w} and more" for i, w in enumerate(["fine", "bad", "great",
                                                                                          "dull", "odd", "long"] * 2)]
    monkeypatch.setattr(driver, "review_texts", lambda: reviews)
    monkeypatch.setattr(sentiment, "make_scorer", lambda *a, **k: LengthScorer())
    monkeypatch.chdir(ROOT)
    record = yaml.safe_load((ROOT / "configs" / "study" / "sentiment_controls.yaml").read_text())
    record["arms"].update(USER_ARMS)
    record["comparisons"].append({"a": "my_rule", "b": "my_rule_permuted", "question": "Does my rule's choice "
                                  "matter?"})
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    study = load_plan(tmp_path / "plan.yaml").with_settings(**{**TINY, "model": tiny_model_dir})
    assert study.eval_steps() == [1, 2]  # two evaluations per run: half-way and final
    paths = Paths(tmp_path / "out", tmp_path / "work")
    permuted = next(r for r in plan(study) if r.method == "my_rule_permuted")
    with claim(paths.work, config_key(driver.run_config(study, paths, permuted))) as mine:  # another driver's run
        assert mine
        assert driver.run_study(study, paths, only=list(USER_ARMS)) == ["my_rule_b0.5_s0"]
    assert driver.run_study(study, paths, only=list(USER_ARMS)) == ["my_rule_permuted_b0.5_s0"]
    for run_dir in (paths.out / "runs").glob("my_rule*"):
        assert {p.name for p in run_dir.iterdir()} >= {"config.json", "metrics.json", "eval_step1.json", "eval.json",
                                                       "masks.json"}
        half, final = (json.loads((run_dir / f).read_text()) for f in ("eval_step1.json", "eval.json"))
        assert (half["label"], final["label"]) == (f"{run_dir.name.split('-')[0]}@1", run_dir.name.split("-")[0])
        assert half["num_samples"] == final["num_samples"] == 4 * 2  # one evaluation call, split by label
        assert not (paths.work / "checkpoints" / run_dir.name.rsplit("-", 1)[1]).exists()  # deleted after eval
    assert not list(paths.work.rglob("*.ckpt"))  # nor is the fits' own resume checkpoint kept (a GB per run)
    control = json.loads(next((paths.out / "runs").glob("my_rule_permuted_*")).joinpath("config.json").read_text())
    assert control["model"]["masker"] == {"class_path": "sparsepo_lightning.masks.controls.PermutedControl",
                                          "init_args": {"masker": {"class_path": USER_ARMS["my_rule"]["masker"]},
                                                        "seed": 0}}
    assert driver.run_study(study, paths, only=list(USER_ARMS)) == []  # a second sitting finds everything done
    readme = report.write_report(paths.out)  # the plan recorded in study.json
    text = readme.read_text()
    assert f"Partial study: 2 of {len(plan(study))}" in text and "| My rule | 0.5 | 0 | 2 |" in text
    assert "- **Does my rule's choice matter?** " in text and "| My rule − My rule, permuted | 1 | " in text
    assert "## Mask diagnostics" in text and "| My rule, permuted | 1 | " in text
    assert (paths.out / "frontier.png").is_file()
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
    assert "SparsePO common − TDPO1 at β × c (constant mask c)" in text and "SparsePO common − DPO" in text
    assert "higher frontier score than DPO" in text  # built in: sparsepo_common is 0.1*beta above dpo
    assert "## Under a second scorer (textblob)" in text  # half of every reward: the same verdicts
    assert "- Under textblob the verdict against DPO holds" in text
    # the learned method's last logged sparsity over its runs (β 0.1: 31 %, β 0.8: 38 %); random is not learned
    assert "last training step: SparsePO common (start 1) 31.0–38.0 % zeros, mean weight 0.90 (2 runs)." in text
    planned = len(plan(FIRST.with_settings(betas=(0.1, 0.8), seeds=(0,))))
    hours = planned * (10.0 + 5.0) / 3600  # every fake run: 10 s of training, 5 s of evaluation
    assert (f"- Cost: a run takes 0.2 min of training and 0.1 min of evaluation (medians over 6 runs): about "
            f"{hours:.1f} h for the {planned} runs") in text
    # sentiment words carry weight 1, others 0.1: a strong rank correlation with |valence|, p at its minimum
    row = next(line for line in text.splitlines() if line.startswith("| sparsepo_common_b0.1_s0 | reward | chosen"))
    rho_abs, p_abs = float(row.split("|")[5]), row.split("|")[6].strip()
    assert rho_abs > 0.8 and p_abs == "≤ 0.001"  # ties keep ρ below 1; no permutation reaches it: the floor 1/1001
    assert "highest: `' awful'`" in text or "highest: `' bad'`" in text
    assert "In parentheses" not in text  # no run records CPU time
    for figure in ("frontier.png", "sparsity.png", "heatmap_0.png", "heatmap_2.png"):
        assert (tmp_path / figure).stat().st_size > 1000
    assert report.write_report(tmp_path).read_text() == text


def test_the_cost_is_read_in_cpu_time_where_the_logs_record_it(tmp_path):
    """Runs that record ``cpu_seconds`` (the driver's, since it measures them) set the cost line in CPU time, over
    those runs only; the run table gives both clocks. Logs without it keep the wall-clock line (test above)."""
    _fake_logs(tmp_path)
    for i, run_dir in enumerate(sorted((tmp_path / "runs").glob("*_s0-k*"))[:4]):  # 4 of the 6 runs record it
        for name, cpu in (("metrics.json", 6.0 + i), ("eval.json", 3.0)):
            record = json.loads((run_dir / name).read_text())
            (run_dir / name).write_text(json.dumps(record | {"cpu_seconds": cpu}))
    text = report.write_report(tmp_path).read_text()
    planned = len(plan(FIRST.with_settings(betas=(0.1, 0.8), seeds=(0,))))
    hours = planned * (7.5 + 3.0) / 3600  # the median of 6, 7, 8 and 9 s of training; 3 s of evaluation
    assert ("- Cost: a run takes 0.1 min of training and 0.1 min of evaluation in CPU time (user + system; medians "
            f"over the 4 runs that record it): about {hours:.1f} CPU-hours for the {planned} runs") in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and " | 10 " in line]
    assert len(rows) == 6 and sum(" | 10 (6) | 5 (3) | " in line for line in rows) == 1
    assert sum(" | 10 | 5 | " in line for line in rows) == 2
    assert "In parentheses, where the logs record it: the CPU seconds (user + system)" in text
    assert report.run_minutes(report.load_runs(tmp_path, report.recorded_plan(tmp_path))[0])[2:] == (4, "CPU")


def test_a_subprocess_is_timed_in_cpu_seconds_that_waiting_does_not_inflate(tmp_path, monkeypatch):
    """``run_cli`` measures the CPU time of the process it runs apart from the wall time: a child that computes for
    0.3 s and then waits 1 s costs about 0.3 CPU seconds."""
    import sys

    from sparsepo_lightning.study import machine

    run = subprocess.run
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3:\n    pass\ntime.sleep(1.0)"
    monkeypatch.setattr(machine.subprocess, "run", lambda command, **kw: run([sys.executable, "-c", busy], **kw))
    wall, cpu = machine.run_cli(["fit"], tmp_path / "fit.log")
    assert 0.3 <= cpu < 0.8 and wall >= 1.3


STOPPED_DRIVER = """
import subprocess, sys, time
from pathlib import Path
from sparsepo_lightning.study import machine
run = subprocess.run
child = "import os, time; open(%r, 'w').write(str(os.getpid())); time.sleep(60)"
machine.subprocess.run = lambda command, **kw: run([sys.executable, "-c", child], **kw)
with machine.claim(Path(%r), "run-key") as mine, machine.stop_on_sigterm():
    assert mine
    machine.run_cli(["fit"], Path(%r))
"""


def test_sigterm_stops_the_driver_and_the_run_it_holds(tmp_path):
    """A driver stopped by SIGTERM (a scheduler's pre-emption) kills the run in progress and waits for it, and
    releases the run's claim: nothing keeps writing into a run that another driver may take up."""
    import os
    import signal
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    script = STOPPED_DRIVER % (str(pid_file), str(tmp_path / "work"), str(tmp_path / "fit.log"))
    driver_process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_file.read_text() and held(tmp_path / "work", "run-key")
    driver_process.send_signal(signal.SIGTERM)
    assert driver_process.wait(timeout=30) == 128 + signal.SIGTERM, driver_process.stderr.read()[-2000:]
    with pytest.raises(ProcessLookupError):  # the run went with its driver
        os.kill(int(pid_file.read_text()), 0)
    assert held(tmp_path / "work", "run-key") is False


def test_the_seed_level_view_tests_the_per_seed_differences_and_corrects_across_its_rows():
    from sparsepo_lightning.study import verdicts

    study = load_plan(ROOT / "configs" / "study" / "sentiment_controls.yaml")
    first, second, third, fourth = study.comparisons[:4]
    section = {"comparisons": {first: {"seeds": 3, "seed_differences": np.array([1.0, 2.0, 3.0])},
                               second: {"seeds": 2, "seed_differences": np.array([0.01, -0.03])},
                               third: {"seeds": 1, "seed_differences": np.array([0.5])},  # no t-test on 1 seed
                               fourth: {"unscored": True, "seeds": 3}}}
    lines = verdicts.seed_level_lines(study, section)
    assert "Holm-adjusted across the 2 comparisons of this table" in lines[0]
    rows = [line for line in lines if line.startswith(f"| {study.arms[first.a].label} − ")
            or line.startswith(f"| {study.arms[second.a].label} − ")]
    assert len(rows) == 2 and len(lines) == 6  # text, blank, header, rule, 2 rows
    # 1, 2, 3: t = 2√3 on 2 dof, p 0.0742 (test_study_stats); 0.01, -0.03: t = -0.5 on 1 dof, p 0.7048; Holm: the
    # smaller p times 2 (0.1484), the larger kept (0.7048 > 0.1484); resolution on 1 dof: (12.7062 + 1.3764) × 0.02
    assert rows[0].endswith("| 3 | +1.0000, +2.0000, +3.0000 | +2.0000 | 0.5774 | [-0.4841, +4.4841] | 0.074 | "
                            "0.148 | 3.0965 |")
    assert "| 2 | +0.0100, -0.0300 | -0.0100 | 0.0200 | " in rows[1] and rows[1].endswith("| 0.705 | 0.705 | 0.2817 |")
    assert verdicts.seed_level_lines(study, {"comparisons": {third: section["comparisons"][third]}}) == []


def test_the_crossed_view_sets_the_shared_prompt_draw_beside_the_plans_bootstrap():
    from sparsepo_lightning.study import verdicts

    study = load_plan(ROOT / "configs" / "study" / "sentiment_controls.yaml")
    first, second, third = study.comparisons[:3]
    crossed = {"se": 0.003, "p": 0.04, "interval": (0.001, 0.012)}
    section = {"floor": 2 / 1001, "comparisons": {
        first: {"seeds": 3, "estimate": 0.0065, "se": 0.002, "crossed": crossed},
        second: {"seeds": 2, "estimate": -0.001, "se": 0.004,
                 "crossed": {"se": 0.004, "p": 2 / 1001, "interval": (-0.009, 0.007)}},
        third: {"unscored": True, "seeds": 3}}}
    lines = verdicts.crossed_lines(study, section)
    assert "Holm-adjusted across the 2 comparisons of this table" in lines[0] and len(lines) == 6
    # Holm: the floor 0.002 x 2 = 0.004, an upper bound as its raw p is; 0.04 kept (0.04 > 0.004); ratio 0.003 / 0.002
    # = 1.50; resolution 2.8016 SE
    assert lines[4] == (f"| {study.arms[first.a].label} − {study.arms[first.b].label} | 3 | +0.0065 | 0.0020 | "
                        "0.0030 | 1.50 | [+0.0010, +0.0120] | 0.040 | 0.040 | 0.0084 |")
    assert lines[5].endswith("| 2 | -0.0010 | 0.0040 | 0.0040 | 1.00 | [-0.0090, +0.0070] | ≤ 0.002 | ≤ 0.004 | "
                             "0.0112 |")
    assert verdicts.crossed_lines(study, {"floor": 0.002, "comparisons": {third: {"unscored": True}}}) == []


def test_the_setup_says_which_arms_were_cut_to_one_seed_and_quotes_the_pilot():
    import dataclasses

    from sparsepo_lightning.study.planfile import Comparison
    from sparsepo_lightning.study.report import cut_arms_line

    study = load_plan(ROOT / "configs" / "study" / "sentiment_controls.yaml")
    assert cut_arms_line(study) == ["- Cut: DPO, TDPO1 ran on seed 0 only (in no listed comparison); every other arm "
                                    "on seeds 0, 1, 2."]
    compared = dataclasses.replace(study, comparisons=(Comparison("dpo", "dense", "?"),))
    assert cut_arms_line(compared) == ["- Cut: DPO, TDPO1 ran on seed 0 only; every other arm on seeds 0, 1, 2."]
    assert cut_arms_line(study.with_settings(seeds=(0,))) == []  # one seed: nothing was cut
    report = (ROOT / "reports" / "sentiment_controls" / "README.md").read_text(encoding="utf-8")
    assert "- Pilot (run once, before the study, to fix lr, steps and β): sparsepo study sentiment run " in report
    assert "so the first setting passed: lr 5e-5, 64 steps, β 0.03 and 0.3.\n" in report


def test_the_conclusion_cautions_where_a_range_is_mostly_the_line_from_the_reference():
    from sparsepo_lightning.study import verdicts

    study = load_plan(ROOT / "configs" / "study" / "sentiment_controls.yaml")
    first, second = study.comparisons[:2]
    result = {"seeds": 2, "estimate": 0.01, "interval": (-0.01, 0.03), "p": 0.5, "holm": 1.0, "resolution": 0.02,
              "kl_max": 1.0}
    section = {"floor": 2 / 1001, "comparisons": {
        first: {**result, "before_first": np.array([0.4, 0.8, 0.6, 0.8])},  # mean 0.65: cautioned
        second: {**result, "before_first": np.array([0.5, 0.5, 0.5, 0.5])}}}  # exactly half: not
    lines = verdicts.verdict_lines(study, section)
    assert len(lines) == 3 and lines[2].startswith("- Read with care: in 1 of the 2 comparisons, more than half of")
    assert f"({study.arms[first.a].label} − {study.arms[first.b].label}: 65 %)" in lines[2]
    section["comparisons"][first]["before_first"] = np.array([0.1, 0.2])
    assert len(verdicts.verdict_lines(study, section)) == 2


def test_the_valence_table_names_its_statistic_and_its_test():
    from sparsepo_lightning.study.report import valence_section

    study = load_plan(ROOT / "configs" / "study" / "sentiment_controls.yaml")
    lines = valence_section(study, [])
    assert lines[0].startswith("Spearman's rank correlation ρ") and "1,000 permutations" in lines[0]
    assert "≤ 0.001 at its floor" in lines[0] and lines[2].startswith("| run | mask | side | tokens | ρ")


def test_the_one_sentence_conclusion_names_each_difference_and_the_resolution_of_the_rest():
    from sparsepo_lightning.study import verdicts

    study = load_plan(ROOT / "configs" / "study" / "sentiment_controls.yaml")
    first, second, third = study.comparisons[:3]
    found = {"estimate": -0.0123, "holm": 0.01, "resolution": 0.02}
    none_a, none_b = {"estimate": 0.001, "holm": 0.4, "resolution": 0.015}, {"estimate": 0.0, "holm": 1.0,
                                                                           "resolution": 0.0304}
    label = {c: (study.arms[c.a].label, study.arms[c.b].label) for c in (first, second, third)}
    assert verdicts.summary_sentence(study, {"comparisons": {first: {"unscored": True}}}) == \
        "No listed comparison can be scored yet."
    assert verdicts.summary_sentence(study, {"comparisons": {first: none_a, second: none_b}}) == (
        "None of the 2 comparisons scored so far (of the 5 listed) shows a measurable difference in reward at equal "
        "KL; the design detects true differences of 0.0150 to 0.0304 or more with 80 % power.")
    assert verdicts.summary_sentence(study, {"comparisons": {first: found, second: none_a,
                                                             third: {"unscored": True}}}) == (
        f"{label[first][0]} scores lower than {label[first][1]} (-0.0123 reward at equal KL); the other 1 of the 2 "
        "comparisons scored so far (of the 5 listed) shows no measurable difference (detectable: 0.0150 or more with "
        "80 % power).")
    assert verdicts.summary_sentence(study, {"comparisons": {first: none_a, second: {"unscored": True}}}) == (
        "The 1 comparison scored so far (of the 5 listed) shows no measurable difference in reward at equal KL; the "
        "design detects true differences of 0.0150 or more with 80 % power.")
    assert verdicts.summary_sentence(study, {"comparisons": {first: found}}).endswith("at equal KL).")
    assert verdicts._holm_family(3, 5) == ("3 comparisons scored so far (the plan lists 5 before the runs; the "
                                           "complete study corrects across all 5)")
    assert verdicts._holm_family(1, 5).startswith("1 comparison scored so far (the plan lists 5")


def test_the_second_scorer_changes_a_verdict_only_when_its_category_changes():
    """Both "no measurable difference" (with different resolutions) keep the verdict, as do two differences of the
    same sign; a sign flip or a difference that one scorer finds and the other does not change it."""
    from sparsepo_lightning.study import verdicts

    study = load_plan(ROOT / "configs" / "study" / "sentiment_controls.yaml")
    c = study.comparisons[0]
    none_a, none_b = {"estimate": 0.001, "holm": 0.7, "resolution": 0.0067, "p": 0.4}, \
        {"estimate": -0.002, "holm": 0.9, "resolution": 0.0083, "p": 0.5}
    up, down = {"estimate": 0.02, "holm": 0.01, "p": 0.005}, {"estimate": -0.02, "holm": 0.01, "p": 0.005}
    cases = [(none_a, none_b, "keeps its verdict"), (up, {**up, "estimate": 0.03}, "keeps its verdict"),
             (up, down, "changes verdict"), (up, none_a, "changes verdict"), (none_a, down, "changes verdict")]
    for first, second, words in cases:
        (line,) = verdicts.second_scorer_lines(study, {"comparisons": {c: first}, "floor": 0.002},
                                               {"comparisons": {c: second}, "floor": 0.002}, "textblob")
        assert f" {words}: " in line, (first, second, line)


def test_a_run_key_that_looks_like_a_number_stays_the_loggers_name(cli_zygote, tmp_path):
    """6363e75978 (a real run key) is a number to jsonargparse (inf), even quoted: the driver's config names the log
    folder by the key and gives the logger no name, so the logs land in <work>/logs/<key>/version_0."""
    study = load_plan(ROOT / "configs" / "study" / "sentiment_controls.yaml")
    paths = Paths(tmp_path / "out", tmp_path / "work")
    run = next(r for r in plan(study) if r.method == "dense")
    config_file = driver.training_file(study, paths, run, driver.run_config(study, paths, run), "6363e75978")
    done = cli_zygote.run("fit", "--config", str(config_file), "--print_config")
    assert done.returncode == 0, done.stderr[-2000:]
    logger = yaml.safe_load(done.stdout)["trainer"]["logger"]["init_args"]
    assert logger["save_dir"] == str(paths.work / "logs" / "6363e75978") and logger["name"] == ""


def test_a_claim_is_held_by_one_holder_at_a_time_and_released_after(tmp_path):
    with claim(tmp_path, "abc") as first, claim(tmp_path, "abc") as second, claim(tmp_path, "other") as third:
        assert first and not second and third
    with claim(tmp_path, "abc") as again:
        assert again
    with pytest.raises(RuntimeError), claim(tmp_path, "abc"):
        raise RuntimeError("a run that fails releases its claim")
    with claim(tmp_path, "abc") as after_failure:
        assert after_failure


def test_sparsepo_study_plan_lists_every_run(cli_zygote, tmp_path):
    done = cli_zygote.run("study", "sentiment", "plan", "--out", str(tmp_path / "out"), "--work",
                          str(tmp_path / "work"), "--betas", "0.5", "--seeds", "3")
    assert done.returncode == 0, done.stderr
    *lines, summary = done.stdout.splitlines()
    assert len(lines) == len(METHODS)
    dpo = next(line for line in lines if line.startswith("dpo_b0.5_s3 "))
    assert dpo.endswith("to do")
    assert any(line.startswith("random_b0.5_s3 ") and "waits for its matched run" in line for line in lines)
    assert summary == f"{len(METHODS)} runs: {len(METHODS) - 1} to do, 1 waits for its matched run"
    with claim(tmp_path / "work", dpo.split()[1]):  # a driver (here: this process) holds the run's claim
        again = cli_zygote.run("study", "sentiment", "plan", "--out", str(tmp_path / "out"), "--work",
                               str(tmp_path / "work"), "--betas", "0.5", "--seeds", "3")
    assert f"{dpo.removesuffix('to do')}running" in again.stdout.splitlines()
    assert again.stdout.splitlines()[-1].startswith(f"{len(METHODS)} runs: 1 running, {len(METHODS) - 2} to do, ")


def test_held_reads_the_kernel_lock_table_without_taking_the_lock(tmp_path):
    assert held(tmp_path, "abc") is False  # never claimed
    with claim(tmp_path, "abc"):
        assert held(tmp_path, "abc") is True
        assert held(tmp_path, "abc", locks=tmp_path / "missing") is None  # no lock table (not Linux): unknown
        with claim(tmp_path, "abc") as second:
            assert not second  # held() took nothing: the claim is still this holder's alone
    assert held(tmp_path, "abc") is False  # released; the lock file stays
    inode = (tmp_path / "claims" / "abc.lock").stat().st_ino
    table = tmp_path / "locks"
    table.write_text(f"1: POSIX  ADVISORY  WRITE 77 fe:00:{inode} 0 EOF\n2: FLOCK  ADVISORY  WRITE 78 fe:00:9{inode} 0 "
                     f"EOF\n3: FLOCK  ADVISORY  WRITE 79 fd:01:{inode} 0 EOF\n")
    assert held(tmp_path, "abc", locks=table) is True  # only the FLOCK line on this inode counts
    table.write_text(table.read_text().splitlines()[0] + "\n")
    assert held(tmp_path, "abc", locks=table) is False


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
    assert driver.rescore(paths) == ["dpo_b0.1_s0-abc/eval.json"]
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["reward_mean"] == 0.1 and result["second_scorer"] == "textblob"
    assert result["second_reward_per_prompt"] == [pytest.approx(great_of(" a great film") / 2, abs=1e-6),
                                                  pytest.approx(great_of(" a terrible film"), abs=1e-6)]
    assert driver.rescore(paths) == []  # done once


def great_of(text):
    from sparsepo_lightning.builders.scorers import TextBlobScorer

    return TextBlobScorer()([text])[0]


@pytest.mark.parametrize("name", ["sentiment", "pilot", "sentiment_controls"])
def test_the_committed_report_is_what_its_committed_logs_regenerate(name, tmp_path, monkeypatch):
    """`make study-report` on the committed logs alone writes the committed README.md, to the character: the first
    study, the controls study's pilot, and the controls study as far as its committed runs go (regenerated as
    ``reports/<name>`` relative to the working folder, as the command that wrote it ran, since the README quotes that
    command). Commit a study's new runs together with its regenerated report.

    Only evaluated runs are committed; a run the study is making in this work tree (no ``eval.json`` yet) is left out.
    """
    committed, out = ROOT / "reports" / name, tmp_path / "reports" / name
    out.mkdir(parents=True)
    for file in ("study.json", "data.json"):
        (out / file).write_bytes((committed / file).read_bytes())
    for run_dir in (committed / "runs").iterdir():
        if (run_dir / "eval.json").is_file():
            shutil.copytree(run_dir, out / "runs" / run_dir.name)
    monkeypatch.chdir(tmp_path)
    regenerated = report.write_report(Path("reports") / name).read_text(encoding="utf-8")
    assert regenerated == (committed / "README.md").read_text(encoding="utf-8"), \
        f"reports/{name}/README.md is stale: run `sparsepo study sentiment report --out reports/{name}` and commit it"


HIERARCHICAL_PLAN = {
    "name": "toy", "title": "Toy controls", "statistics": "hierarchical", "evaluations": 2, "bootstrap": 200,
    "settings": {"steps": 4, "betas": [0.1, 0.8], "seeds": [0, 1, 2]},
    "arms": {"learned": {"label": "Learned", "objective": "SparsePO", "masker": "LearnedMasker"},
             "permuted": {"label": "Permuted", "control_of": "learned", "control": "PermutedControl"},
             "tdpo1": {"label": "TDPO1", "objective": "TDPO1"}},
    "comparisons": [{"a": "learned", "b": "permuted", "question": "Does the learned choice matter?"},
                    {"a": "tdpo1", "b": "permuted", "question": "Does TDPO1 differ from the permuted mask?"}],
}


def _fake_plan_logs(out: Path) -> None:
    """3 seeds × 2 β × 2 evaluated steps per arm; ``learned`` is 0.05 reward above the others at every KL, seeds
    shift everything by 0.03 per seed."""
    rng = np.random.default_rng(1)
    prompts = 30
    (out / "runs" / "reference-x").mkdir(parents=True)
    (out / "study.json").write_text(json.dumps({"settings": HIERARCHICAL_PLAN["settings"], "hardware": "test",
                                                "plan": HIERARCHICAL_PLAN}))
    anchor = rng.normal(0.1, 0.05, prompts)
    (out / "runs" / "reference-x" / "eval.json").write_text(json.dumps({
        "reward_mean": float(anchor.mean()), "reward_sem": 0.01, "kl_mean": 0.0, "kl_sem": 0.0,
        "reward_per_prompt": anchor.tolist(), "kl_per_prompt": [0.0] * prompts}))
    for i, arm in enumerate(HIERARCHICAL_PLAN["arms"]):
        for seed in (0, 1, 2):
            for beta in (0.1, 0.8):
                run_dir = out / "runs" / f"{arm}_b{beta:g}_s{seed}-k{i}{seed}{beta}"
                run_dir.mkdir()
                for step in (2, 4):
                    kl = np.abs(rng.normal(step / beta / 10, 0.1, prompts))
                    reward = anchor + 0.2 * kl + (0.05 if arm == "learned" else 0) + 0.03 * seed + \
                        rng.normal(0, 0.02, prompts)
                    name = "eval.json" if step == 4 else f"eval_step{step}.json"
                    (run_dir / name).write_text(json.dumps({
                        "reward_mean": float(reward.mean()), "reward_sem": 0.01, "kl_mean": float(kl.mean()),
                        "kl_sem": 0.01, "wall_seconds": 5.0, "reward_per_prompt": reward.tolist(),
                        "kl_per_prompt": kl.tolist()}))
                metrics = {"name": run_dir.name.split("-")[0], "method": arm, "beta": beta, "seed": seed, "steps": 4,
                           "wall_seconds": 10.0, "final_val": None, "initial_masks": None, "train": {}}
                (run_dir / "metrics.json").write_text(json.dumps(metrics))
                (run_dir / "config.json").write_text(json.dumps({"model": {}}))
                if arm != "tdpo1":  # learned: weight on two of four tokens; permuted: the same weights shuffled
                    weights = [2.0, 2.0, 0.0, 0.0] if arm == "learned" else [1.0, 1.0, 1.0, 1.0]
                    side = {"tokens": ["a", "b", "c", "d"], "reward": weights, "kl": None}
                    (run_dir / "masks.json").write_text(json.dumps({"global_step": 4, "common": True, "pairs": [
                        {"prompt": "p", "chosen": side, "rejected": side}] * 2}))


def test_a_hierarchical_plan_report_states_a_verdict_per_comparison(tmp_path):
    _fake_plan_logs(tmp_path)
    text = report.write_report(tmp_path).read_text()
    # 18 runs of 3 arms × 3 seeds × 2 β, all evaluated: no partial-study line
    assert "Partial study" not in text and "18 runs of 4 steps × 8 pairs, each evaluated at steps [2, 4]" in text
    assert "Holm: adjusted across the 2 comparisons listed in the plan before the runs." in text
    lines = text.splitlines()
    learned = next(line for line in lines if line.startswith("- **Does the learned choice matter?** "))
    assert "Yes: Learned scores higher than Permuted (+0.0" in learned and "p ≤ 0.02, 3 seeds)." in learned
    assert 0.04 < float(learned.split("(+")[1].split(" ")[0]) < 0.06  # the built-in 0.05
    sentence = next(line for line in lines if line.startswith("**In one sentence:** "))
    estimate = learned.split("(")[1].split(" ")[0]
    resolution = next(line for line in lines if line.startswith("| TDPO1 − Permuted | ")).split("|")[9].strip()
    assert sentence == (f"**In one sentence:** Learned scores higher than Permuted ({estimate} reward at equal KL); "
                        "the other 1 of the 2 listed comparisons shows no measurable difference (detectable: "
                        f"{resolution} or more with 80 % power).")
    same = next(line for line in lines if line.startswith("- **Does TDPO1 differ from the permuted mask?** "))
    assert "No measurable difference between TDPO1 and Permuted; this design detects a true difference of" in same
    row = next(line for line in lines if line.startswith("| Learned − Permuted | 3 | [0, "))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[5] == "≤ 0.01" and cells[6] == "≤ 0.02"  # no resample at or below 0: the floor 2/201; Holm × 2
    assert float(cells[8]) == pytest.approx(2.801585 * float(cells[7]), abs=2e-4)  # resolution = 2.80 × SE
    regression = next(line for line in lines if line.startswith("| Learned − Permuted | +0.0"))
    assert 0.03 < float(regression.split("|")[2]) < 0.07  # the built-in 0.05 at equal KL and seed
    assert "| Learned | 12 | " in text and "| TDPO1 | 12 | " in text  # every arm's score: 3 seeds × 2 β × 2 steps
    diagnostics = next(line for line in lines if line.startswith("| Learned | 6 | "))
    # two of four tokens at 2: zeros 0.5, mean 1, mean kept 2, Gini 0.5, effective-token ratio 0.5
    assert diagnostics == "| Learned | 6 | 0.500 | 1.000 | 2.000 | 0.500 | 0.500 | 1.000 | 0.000 |"
    assert "| Permuted | 6 | 0.000 | 1.000 | 1.000 | 0.000 | 1.000 | 0.000 | 0.000 |" in text
    assert report.write_report(tmp_path).read_text() == text

