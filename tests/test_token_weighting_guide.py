"""docs/token-weighting.md works as written: its worked example, a masker in the user's own module, trains through
`sparsepo fit` with no change to any file of the package; its maskers compute what the guide says; its plug-in
table (and the README's) matches configs/methods/."""

from __future__ import annotations

import importlib
import inspect
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.testing import assert_close

from sparsepo_lightning.checks import check_masker_objective
from sparsepo_lightning.cli import run as main
from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.masks import ReferenceOutputs, TokenContext
from sparsepo_lightning.objectives import MaskedSimPO, WeightedDPO
from sparsepo_lightning.types import TokenStats

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "token-weighting.md"
README = ROOT / "README.md"
METHOD_CONFIGS = sorted((ROOT / "configs" / "methods").glob("*.yaml"))
EXAMPLE_MODULE = "my_weights"
EXAMPLE_CLASS = "LowReferenceProbability"
ENTROPY_CLASS = "ReferenceEntropyWeights"


def _section(text: str, heading: str) -> str:
    """The text of the level-2 section whose heading starts with ``heading``, up to the next level-2 heading."""
    match = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _worked_example() -> tuple[str, str]:
    """The worked example's first python block (the masker module) and first yaml block (its config)."""
    section = _section(GUIDE.read_text(), "Worked example")
    return _blocks(section, "python")[0], _blocks(section, "yaml")[0]


def _guide_block(containing: str) -> str:
    matches = [b for b in _blocks(GUIDE.read_text(), "python") if containing in b]
    assert len(matches) == 1, f"expected one python block of the guide containing {containing!r}"
    return matches[0]


@pytest.fixture
def example(tmp_path, monkeypatch):
    """The worked example written to ``tmp_path/my_weights.py`` and imported from there, as a user's own module."""
    code, _ = _worked_example()
    (tmp_path / f"{EXAMPLE_MODULE}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(EXAMPLE_MODULE, None)
    importlib.invalidate_caches()
    module = importlib.import_module(EXAMPLE_MODULE)
    yield module
    sys.modules.pop(EXAMPLE_MODULE, None)


def test_worked_example_trains_through_sparsepo_fit_from_the_users_module(example, tiny_model_dir, pairs_file,
                                                                          tmp_path, monkeypatch):
    _, config = _worked_example()
    config_file = tmp_path / "my_weights.yaml"
    config_file.write_text(config)
    monkeypatch.chdir(ROOT)
    cli = main(["fit", "--config", "configs/debug/tiny.yaml", "--config", str(config_file),
                "--model.model", tiny_model_dir, "--data.train_file", pairs_file, "--data.val_file", pairs_file,
                "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.max_steps", "2",
                "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert "train/masks/mean_reward" in metrics
    assert 0.0 <= float(metrics["train/masks/mean_reward"]) <= 1.0
    masker = cli.model.masker
    assert isinstance(cli.model.objective, WeightedDPO)
    assert type(masker) is example.LowReferenceProbability
    assert Path(inspect.getfile(type(masker))).parent == tmp_path  # the user's module, not the package
    step = cli.model.last_step  # the masks the loss used are the example's rule applied to that step's statistics
    expected = ((step.stats.reference_logps < math.log(0.5)) & step.stats.response_mask).float()
    assert_close(step.masks.reward, expected)
    assert Path(cli.trainer.logger.log_dir).is_relative_to(tmp_path)  # the run wrote its logs and checkpoint there


def test_the_package_knows_nothing_of_the_example():
    """The example needs no edit of the package or its configs: none of their files names it. (A before/after
    ``git diff`` around the run would also catch edits that other work makes to the tree meanwhile.)"""
    names = (EXAMPLE_MODULE, EXAMPLE_CLASS, ENTROPY_CLASS)
    for path in [*(ROOT / "sparsepo_lightning").rglob("*.py"), *(ROOT / "configs").rglob("*.yaml")]:
        text = path.read_text(errors="replace")
        assert not any(name in text for name in names), f"{path.relative_to(ROOT)} names the guide's example"


def test_worked_example_masker_on_a_hand_made_batch(example):
    # one pair (2 rows: chosen, rejected), 4 shifted columns; reference probabilities of the labels
    mask = torch.tensor([[False, True, True, True], [False, True, True, False]])
    probs = torch.tensor([[0.9, 0.9, 0.3, 0.6], [0.1, 0.4, 0.7, 0.2]])
    stats = TokenStats(policy_logps=torch.zeros(2, 4), reference_logps=probs.log() * mask, response_mask=mask)
    masker = example.LowReferenceProbability(p=0.5)
    masks = masker(None, mask, TokenContext(mask, stats=stats))
    expected = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])  # off-response columns stay 0
    assert_close(masks.reward, expected)
    assert masks.common and masks.reward.dtype == torch.float32 and not masks.learned
    assert_close(example.LowReferenceProbability(p=0.95)(None, mask, TokenContext(mask, stats=stats)).reward,
                 mask.float())
    assert masker.takes_context and masker.needs_reference and masker.frozen_model_names() == ()
    with pytest.raises(ValueError, match="TokenContext"):
        masker(None, mask)
    with pytest.raises(ValueError, match="p must be in"):
        example.LowReferenceProbability(p=0.0)
    with pytest.raises(ConfigError, match="reference-free"):  # the guide: refused under MaskedSimPO
        check_masker_objective(masker, MaskedSimPO())
    check_masker_objective(masker, WeightedDPO())


def _entropy_masker(tmp_path, monkeypatch):
    (tmp_path / "entropy_weights.py").write_text(_guide_block(f"class {ENTROPY_CLASS}"))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("entropy_weights", None)
    importlib.invalidate_caches()
    module = importlib.import_module("entropy_weights")
    monkeypatch.setitem(sys.modules, "entropy_weights", module)
    return getattr(module, ENTROPY_CLASS)


def test_entropy_example_weights_by_the_reference_state_before_the_token(tmp_path, monkeypatch):
    masker_class = _entropy_masker(tmp_path, monkeypatch)
    g = torch.Generator().manual_seed(0)
    rows, positions, d, vocab = 4, 6, 5, 7
    head = nn.Linear(d, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, d, generator=g))
    hidden = torch.randn(rows, positions, d, generator=g)
    mask = torch.zeros(rows, positions - 1, dtype=torch.bool)
    for i, (start, end) in enumerate([(1, 5), (2, 4), (0, 5), (3, 4)]):
        mask[i, start:end] = True
    masks = masker_class(chunk_size=3)(ReferenceOutputs(hidden, None, head), mask, TokenContext(mask))
    expected = torch.zeros(rows, positions - 1)
    for i in range(rows):
        for t in range(positions - 1):
            if mask[i, t]:
                p = torch.softmax(head(hidden[i, t]).detach(), -1)  # the state at position t predicts label t+1
                expected[i, t] = -(p * p.log()).sum() / math.log(vocab)
    assert_close(masks.reward, expected)
    assert masks.common
    later = hidden.clone()
    later[:, 3] += 10.0  # changes the state at position 3: only column 3 may move (positions <= t)
    moved = masker_class()(ReferenceOutputs(later, None, head), mask).reward != masks.reward
    assert not moved[:, :3].any() and not moved[:, 4:].any() and moved[mask[:, 3], 3].all()
    last = hidden.clone()
    last[:, -1] += 10.0  # the last position predicts no label
    assert_close(masker_class()(ReferenceOutputs(last, None, head), mask).reward, masks.reward)
    nn.init.zeros_(head.weight)  # uniform prediction: weight 1 on every response token
    assert_close(masker_class()(ReferenceOutputs(hidden, None, head), mask).reward, mask.float())


def _table_rows(section: str) -> list[str]:
    return [line for line in section.splitlines() if line.startswith("|") and "configs/methods/" in line]


def _config(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["model"]


MASKLESS = ("dpo", "bco", "aligndistil", "treg")
"""Method configs without a masker (objectives only): not token weightings, so not in the guide's table
(AlignDistil is documented in docs/full-distribution.md)."""


@pytest.mark.parametrize("path", [p for p in METHOD_CONFIGS if p.stem not in MASKLESS], ids=lambda p: p.stem)
def test_guide_plugin_table_lists_every_method_config(path):
    table = _table_rows(_section(GUIDE.read_text(), "Shipped plug-ins"))
    rows = [r for r in table if f"configs/methods/{path.name}" in r]
    assert len(rows) == 1, f"the guide's plug-in table has no single row for configs/methods/{path.name}"
    row, model = rows[0], _config(path)
    assert f"`{model['masker']['class_path'].removeprefix('sparsepo_lightning.methods.')}`" in row
    assert f"`{model['objective']['class_path'].rsplit('.', 1)[1]}`" in row
    assert re.search(r"arXiv \d{4}\.\d{4,5}", row)
    frozen = model.get("frozen_models") or {}
    assert all(f"`{name}`" in row for name in frozen) and (frozen or "none" in row)


def test_guide_plugin_table_has_no_row_without_a_config():
    rows = _table_rows(_section(GUIDE.read_text(), "Shipped plug-ins"))
    named = {m for row in rows for m in re.findall(r"configs/methods/(\w+)\.yaml", row)}
    assert named == {p.stem for p in METHOD_CONFIGS} - set(MASKLESS)


def test_readme_plugin_table_lists_every_method_config():
    text = README.read_text()
    match = re.search(r"^### Token-level methods as plug-ins$(.*?)(?=^#{2,3} )", text, flags=re.M | re.S)
    assert match, "README: no '### Token-level methods as plug-ins' subsection"
    section = match.group(1)
    assert "(docs/token-weighting.md)" in section
    rows = _table_rows(section)
    named = [m for row in rows for m in re.findall(r"configs/methods/(\w+)\.yaml", row)]
    assert sorted(named) == sorted(p.stem for p in METHOD_CONFIGS)
    for path in METHOD_CONFIGS:
        (row,) = [r for r in rows if f"configs/methods/{path.name}" in r]
        assert all(f"`{name}`" in row for name in (_config(path).get("frozen_models") or {}))


def test_guide_links_stay_in_the_project_or_point_to_papers():
    text = GUIDE.read_text()
    for url in re.findall(r"https?://[^\s)>`]+", text):
        assert url.startswith("https://arxiv.org/abs/"), url
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
             for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in slugs, f"broken anchor #{anchor}"


def test_every_dotted_name_in_the_guide_exists():
    text = GUIDE.read_text()
    for name in sorted(set(re.findall(r"\bsparsepo_lightning(?:\.\w+)+", text))):
        parts = name.split(".")
        for split in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            for attr in parts[split:]:
                obj = getattr(obj, attr)
            break
        else:
            pytest.fail(f"{name} does not exist")
