"""Study plan files: the shipped plans parse, every class and argument they name exists, the first study's plan
reproduces its committed runs' keys, a user's arm and its control resolve to the expected config, and bad plans give
errors that name the file, the line, the key and the fix."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import pytest

from sparsepo_lightning.study.plan import Paths, Run, config_key, plan, training_config
from sparsepo_lightning.study.planfile import PlanError, load_plan

ROOT = Path(__file__).resolve().parents[1]
PLANS = sorted((ROOT / "configs" / "study").glob("*.yaml"))


def _check_class(config: dict, where: str) -> None:
    module, name = config["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    parameters = inspect.signature(cls.__init__).parameters
    for key, value in config.get("init_args", {}).items():
        assert key in parameters, f"{where}: {config['class_path']} has no argument {key}"
        if isinstance(value, dict) and "class_path" in value:
            _check_class(value, where)


@pytest.mark.parametrize("path", PLANS, ids=[p.stem for p in PLANS])
def test_shipped_plans_parse_and_name_existing_classes_and_arguments(path, tmp_path):
    study = load_plan(path)
    assert study.comparisons and len(plan(study)) > 0
    paths = Paths(tmp_path, tmp_path / "work")
    for run in plan(study):
        config = training_config(study, paths, run, {"keep_rate": 0.5, "value": 1.0})
        _check_class(config["model"]["objective"], run.name)
        if "masker" in config["model"]:
            _check_class(config["model"]["masker"], run.name)


def test_the_controls_plan_is_the_issue_design():
    study = load_plan(ROOT / "configs" / "study" / "sentiment_controls.yaml")
    assert study.statistics == "hierarchical" and study.evaluations >= 2 and len(study.settings.seeds) >= 3
    controls = {name: (arm.control.rsplit(".", 1)[1], next(c.a for c in study.comparisons if c.b == name))
                for name, arm in study.arms.items() if arm.control}
    assert controls == {"dense_permuted": ("PermutedControl", "dense"),
                        "dense_response_mean": ("ResponseMeanControl", "dense"),
                        "sparse50_permuted": ("PermutedControl", "sparse50"),
                        "sparse50_bernoulli": ("BernoulliControl", "sparse50"),
                        "rho1_bernoulli": ("BernoulliControl", "rho1")}
    assert study.arms["sparse50"].masker["init_args"]["target_sparsity"] == 0.5
    assert study.eval_steps() == [study.settings.steps // 2, study.settings.steps]
    assert "pilot" in study.record


def test_the_plans_settings_are_the_ones_its_committed_pilot_ran_and_passed():
    """The plan's lr, steps and low β are those of the committed pilot (reports/pilot), whose highest-KL evaluation
    of every arm it ran reaches >= 1 nat (the issue's criterion); the high β is 10x the low one."""
    study = load_plan(ROOT / "configs" / "study" / "sentiment_controls.yaml")
    pilot = ROOT / "reports" / "pilot"
    settings = json.loads((pilot / "study.json").read_text())["settings"]
    low, high = study.settings.betas
    assert (study.settings.lr, study.settings.steps, [low]) == (settings["lr"], settings["steps"], settings["betas"])
    assert high == pytest.approx(10 * low)
    reach: dict[str, float] = {}
    for run_dir in (pilot / "runs").iterdir():
        config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else None
        if config is None:
            continue  # the reference's evaluation
        arm = run_dir.name.split("_b")[0]
        kls = [json.loads(f.read_text())["kl_mean"] for f in run_dir.glob("eval*.json")]
        reach[arm] = max(kls)
    assert set(reach) == {"tdpo1", "dense", "sparse50", "rho1"} and min(reach.values()) >= 1.0, reach


def test_the_first_plan_reproduces_the_committed_runs_keys():
    """Every committed run of reports/sentiment is the run the plan file resolves (same config hash)."""
    study = load_plan(ROOT / "configs" / "study" / "sentiment.yaml")
    runs = {r.name: r for r in plan(study)}
    committed = sorted((ROOT / "reports" / "sentiment" / "runs").glob("*/config.json"))
    assert len(committed) == len(runs) == 42
    for path in committed:
        config = json.loads(path.read_text())
        key = config.pop("key")
        run = runs[path.parent.name.rsplit("-", 1)[0]]
        work = Path(config["data"]["init_args"]["train_file"]).parents[1]  # where that study kept its data
        masker = config["model"].get("masker", {}).get("init_args", {})
        matched = {k: masker[k] for k in ("keep_rate", "value")} if run.method == "random" else None
        assert config_key(training_config(study, Paths(ROOT, work), run, matched)) == key, run.name


USER_PLAN = """\
name: mine
settings: {steps: 4, betas: [0.1], seeds: [0, 1]}
evaluations: 2
arms:
  dpo: {objective: DPO, seeds: first}
  mine:
    label: My masker
    objective: {class_path: SparsePO, init_args: {l1_reward: 0.01}}
    masker: {class_path: sparsepo_lightning.methods.topk.MyMasker, init_args: {k: 0.5, seed: $seed}}
    overrides: {model: {mask_lr: 0.01}, data: {batch_size: 4}}
    betas: [0.1, 0.5]
  mine_permuted: {control_of: mine, control: PermutedControl}
comparisons:
  - {a: mine, b: mine_permuted}
"""


def test_a_users_arm_and_its_control_resolve_to_their_configs(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(USER_PLAN)
    study = load_plan(path)
    runs = [r.name for r in plan(study)]
    # seed by seed, the middle β of the settings first; dpo on the first seed only; mine also at its own β 0.5
    assert runs == ["dpo_b0.1_s0", "mine_b0.1_s0", "mine_permuted_b0.1_s0", "mine_b0.5_s0", "mine_permuted_b0.5_s0",
                    "mine_b0.1_s1", "mine_permuted_b0.1_s1", "mine_b0.5_s1", "mine_permuted_b0.5_s1"]
    paths = Paths(tmp_path, tmp_path / "work")
    mine = training_config(study, paths, Run("mine", 0.5, 1))
    masker = {"class_path": "sparsepo_lightning.methods.topk.MyMasker", "init_args": {"k": 0.5, "seed": 1}}
    assert mine["model"]["objective"] == {"class_path": "sparsepo_lightning.objectives.SparsePO",
                                          "init_args": {"beta": 0.5, "l1_reward": 0.01}}
    assert mine["model"]["masker"] == masker
    assert mine["model"]["mask_lr"] == 0.01 and mine["data"]["init_args"]["batch_size"] == 4
    control = training_config(study, paths, Run("mine_permuted", 0.5, 1))
    assert control["model"]["masker"] == {"class_path": "sparsepo_lightning.masks.controls.PermutedControl",
                                          "init_args": {"masker": masker, "seed": 1}}
    assert control["model"]["objective"] == mine["model"]["objective"]
    assert control["model"]["mask_lr"] == 0.01  # a control inherits its arm's overrides: it differs by token choice
    assert config_key({**control, "model": {**control["model"], "masker": masker}}) == config_key(mine)
    assert study.comparisons[0].question == "My masker vs mine_permuted"
    assert study.eval_steps() == [2, 4] and study.eval_steps(3) == [2, 3]


BAD = [
    ("arms:\n  dpo: {objective: DPO}\n", "name", None, "missing. Fix: add `name:`"),
    ("name: x\nsettings: {steps: 4}\narms:\n  dpo: {objective: DPO, colour: red}\n", "arms.dpo.colour", 4,
     "unknown key. Fix: one of label, objective"),
    ("name: x\nsettings: {lr: 2e-5}\narms:\n  dpo: {objective: DPO}\n", "settings.lr", 2,
     "'2e-5' is not a float"),
    ("name: x\nsettings:\n  stepz: 4\narms:\n  dpo: {objective: DPO}\n", "settings.stepz", 3, "unknown setting"),
    ("name: x\nsettings: {}\narms:\n  c: {control_of: m, control: PermutedControl}\n", "arms.c.control_of", 4,
     "'m' is not another (uncontrolled) arm"),
    ("name: x\nsettings: {}\narms:\n  d: {objective: DPO}\n  c: {objective: DPO, control: PermutedControl}\n",
     "arms.c.control", 5, "a control needs a masker"),
    ("name: x\nsettings: {}\narms:\n  d: {label: D}\n", "arms.d.objective", 4, "missing. Fix: `objective: DPO`"),
    ("name: x\nsettings: {}\narms:\n  d: {objective: DPO}\ncomparisons:\n  - {a: d, b: e}\n",
     "comparisons.0.b", 6, "'e' is not an arm of the plan. Fix: one of d"),
    ("name: x\nsettings: {}\narms:\n  r: {objective: SparsePO, masker: {class_path: RandomMasker, init_args: "
     "{keep_rate: $matched.keep_rate}}}\n", "arms.r.masker", 4, "uses $matched.* without `matches:`"),
    ("name: x\nsettings: {}\nevaluations: 0\narms:\n  d: {objective: DPO}\n", "evaluations", 3,
     "0 is not a positive integer"),
]


@pytest.mark.parametrize(("text", "key", "line", "message"), BAD, ids=[b[1] for b in BAD])
def test_bad_plans_name_the_file_line_key_and_fix(tmp_path, text, key, line, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PlanError) as error:
        load_plan(path)
    text = str(error.value)
    assert text.startswith(f"{path}" + (f", line {line}: " if line else ": ")), text
    assert f": {key}: " in text and message in text and "Fix: " in text, text


def test_a_missing_or_broken_plan_file_says_so(tmp_path):
    with pytest.raises(PlanError, match=r"no such plan file. Fix: give an existing file to --plan"):
        load_plan(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("name: [x\n")
    with pytest.raises(PlanError, match=r"broken.yaml: not valid YAML"):
        load_plan(tmp_path / "broken.yaml")


def test_the_cli_reports_a_bad_plan_without_a_traceback(cli_zygote, tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\nsettings: {}\narms:\n  d: {objective: DPO, colour: red}\n")
    done = cli_zygote.run("study", "sentiment", "plan", "--plan", str(tmp_path / "bad.yaml"), "--out",
                          str(tmp_path / "out"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "bad.yaml, line 4: arms.d.colour: unknown key" in done.stderr


def test_the_docs_plan_examples_parse(tmp_path):
    """docs/studies.md: its example plan parses, and its "own arm" entries are the ones the driver test runs."""
    import re

    import yaml

    from tests.test_study import USER_ARMS

    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "studies.md").read_text(), flags=re.S)
    (tmp_path / "plan.yaml").write_text(blocks[0])
    study = load_plan(tmp_path / "plan.yaml")
    assert list(study.arms) == ["dpo", "mine", "mine_permuted"] and study.arms["mine_permuted"].control.endswith(
        "controls.PermutedControl")
    assert study.comparisons[0].question == "Does my masker's choice of tokens matter?"
    own = yaml.safe_load(blocks[1])
    assert own["arms"] == USER_ARMS
    record = yaml.safe_load((ROOT / "configs" / "study" / "sentiment_controls.yaml").read_text())
    record["arms"].update(own["arms"])
    record["comparisons"] += own["comparisons"]
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(record))
    assert "my_rule_permuted" in load_plan(tmp_path / "mine.yaml").arms


def test_the_cli_finds_the_plan_recorded_with_the_runs_and_applies_flags(tmp_path):
    from sparsepo_lightning.study.__main__ import _parser, study_from
    from sparsepo_lightning.study.planfile import DEFAULT_PLAN

    out = tmp_path / "out"
    study, where = study_from(_parser().parse_args(["sentiment", "run", "--out", str(out)]))
    assert where == out and study.record == load_plan(DEFAULT_PLAN).record  # nothing recorded: the first study
    (tmp_path / "plan.yaml").write_text(USER_PLAN)
    recorded = load_plan(tmp_path / "plan.yaml")
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"settings": {"steps": 8, "seeds": [5]}, "plan": recorded.record}))
    study, _ = study_from(_parser().parse_args(["sentiment", "run", "--out", str(out), "--seeds", "0", "1"]))
    assert list(study.arms) == ["dpo", "mine", "mine_permuted"]  # the recorded plan, as written (steps 4) + flags
    assert study.settings.steps == 4 and study.settings.seeds == (0, 1)
    study, _ = study_from(_parser().parse_args(["sentiment", "report", "--out", str(out)]))
    assert study.settings.steps == 8 and study.settings.seeds == (5,)  # report: the settings the runs were made with
    study, where = study_from(_parser().parse_args(["sentiment", "plan", "--plan", str(tmp_path / "plan.yaml")]))
    assert where == Path("reports") / "mine"  # default --out: reports/<plan name>
