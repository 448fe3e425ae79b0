"""The documentation site: it builds strictly, and every fenced block on its pages (and in the README) is either run
or says why not.

The rule for a fenced block in ``docs/*.md`` and ``README.md``:

- a ``python`` block runs as written, from the repository root, in a fresh process; when a ``text`` block follows
  it (only blank lines between), that block is what it prints;
- a ``text`` block is output or a diagram and needs nothing;
- any other block is preceded, on the line right before its fence, by ``<!-- not run: <reason> -->`` or by
  ``<!-- tested by: tests/<file>.py::<test> -->`` naming a test function that exists (a python block may carry either
  marker too, e.g. when it needs names a test provides).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_MARKER = re.compile(r"^<!-- (not run|tested by): (.+?) -->$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    marker: tuple[str, str] | None  # (kind, text) of the marker on the line before, if any
    output: str | None  # a ```text block that follows (blank lines between), if any

    def __str__(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The top-level fenced blocks of ``page`` (fences at the start of a line, possibly indented in a list)."""
    lines = page.read_text().splitlines()
    found: list[tuple[int, str, str, tuple[str, str] | None]] = []
    i = 0
    while i < len(lines):
        opening = re.match(r"^\s*```(\S*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        start, language = i, opening.group(1)
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            i += 1
        marker = _MARKER.match(lines[start - 1].strip()) if start > 0 else None
        body = "\n".join(lines[start + 1:i])
        found.append((start, language, body, (marker.group(1), marker.group(2)) if marker else None))
        i += 1
    result = []
    for n, (start, language, body, marker) in enumerate(found):
        output = None
        if n + 1 < len(found) and found[n + 1][1] == "text":
            end = start + body.count("\n") + 2  # the line after the closing fence
            between = lines[end:found[n + 1][0]]
            if all(not line.strip() for line in between):
                output = found[n + 1][2]
        result.append(Block(page, start + 1, language, body, marker, output))
    return result


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]
RUNNABLE = [b for b in ALL_BLOCKS if b.language == "python" and b.marker is None]


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=str)
def test_every_block_runs_or_says_why_not(block):
    if block.marker is None:
        assert block.language in ("python", "text"), (
            f"{block}: a ```{block.language or '(no language)'} block needs `<!-- not run: reason -->` or "
            "`<!-- tested by: tests/file.py::test_name -->` on the line before its fence (or make it ```text output)")
        return
    kind, text = block.marker
    assert text.strip(), f"{block}: the marker gives no reason"
    if kind == "tested by":
        match = re.fullmatch(r"(tests/[\w/]+\.py)::(\w+)", text.strip())
        assert match, f"{block}: `tested by` names tests/<file>.py::<test function>, got {text!r}"
        file, name = match.groups()
        source = (ROOT / file).read_text() if (ROOT / file).is_file() else ""
        assert re.search(rf"^def {name}\(", source, re.M), f"{block}: no test function {name} in {file}"


def test_the_rule_has_runnable_blocks_and_catches_a_bare_one(tmp_path):
    """Some block of the docs is really run; an unmarked ```bash block and a marker naming no test are caught."""
    assert RUNNABLE, "no runnable python block in the docs"
    page = tmp_path / "page.md"
    page.write_text("intro\n\n```bash\nmake test\n```\n\n"
                    "<!-- tested by: tests/test_docs.py::nothing -->\n```yaml\na: 1\n```\n")
    bare, marked = blocks(page)
    assert bare.language == "bash" and bare.marker is None
    with pytest.raises(AssertionError, match="needs `<!-- not run"):
        test_every_block_runs_or_says_why_not(bare)
    with pytest.raises(AssertionError, match="no test function nothing"):
        test_every_block_runs_or_says_why_not(marked)


@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_python_block_runs_from_the_repository_root(block, cli_zygote):
    """As ``python -c`` from the repository root (forked from the zygote: no interpreter start-up per block)."""
    done = cli_zygote.python(block.code)
    assert done.returncode == 0, f"{block} failed:\n{done.stderr[-3000:]}"
    if block.output is not None:
        assert done.stdout.strip() == block.output.strip(), f"{block}: the ```text block after it is not what it prints"


def test_mkdocs_builds_strictly(tmp_path):
    """`make docs`: every page in the nav, every link and anchor resolves, every API reference imports."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # no theme end-of-life banner
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("SparsePO") > 1


# ---- examples that need names a test provides ------------------------------------------------------------------
def _python_block(page: str, containing: str) -> str:
    matches = [b.code for b in blocks(ROOT / page) if b.language == "python" and containing in b.code]
    assert len(matches) == 1, f"expected one python block in {page} containing {containing!r}"
    return matches[0]


def test_own_data_example_runs(tiny_tokenizer, tmp_path):
    namespace: dict = {}
    exec(compile(_python_block("docs/data.md", "class RankedAnswersDataModule"), "docs/data.md", "exec"), namespace)  # noqa: S102
    path = tmp_path / "ranked.jsonl"
    rows = [{"question": "The movie was", "answers": [" great.", " fine.", " awful."]},
            {"question": "hello", "answers": [" there"]},
            {"question": "hello", "answers": [" world", " there"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = namespace["RankedAnswersDataModule"](train_file=str(path), max_length=32, max_prompt_length=16, batch_size=2)
    dm.tokenizer = tiny_tokenizer
    dm.setup("fit")
    report = dm.report["train"]
    assert report.rows_kept == 2 and report.counts == {"too_few_answers": 1}
    assert f"{path}:2 field 'answers'" in report.summary()
    batch = next(iter(dm.train_dataloader()))
    assert batch.input_ids.shape[0] == 4  # 2 pairs -> 2B rows


def test_functional_api_example_runs_and_matches_a_hand_sum():
    """The functional-API block with B = 2 pairs of T = 3 tokens; independent masks of ones and zero λ give TDPO1."""
    import torch

    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    tensors = {name: torch.randn(2, 3, generator=g) * mask for name in ("pc", "rc", "pr", "rr")}
    tensors |= {"kc": torch.rand(2, 3, generator=g) * mask, "kr": torch.rand(2, 3, generator=g) * mask}
    tensors["pc"].requires_grad_(True)
    namespace: dict = {**tensors, "mask_c": mask, "mask_r": mask,
                       "m_u": torch.ones(4, 3), "m_d": torch.ones(4, 3)}
    exec(compile(_python_block("docs/methods.md", "sparsepo_loss(stats, masks"), "docs/methods.md", "exec"), namespace)  # noqa: S102
    out, stats = namespace["out"], namespace["stats"]
    assert not namespace["masks"].common and out.loss.shape == (2,)
    assert tensors["pc"].grad is not None
    tdpo = namespace["tdpo1_loss"](stats, beta=0.8)
    u = ((tensors["pc"] - tensors["rc"]) - (tensors["pr"] - tensors["rr"])).sum(-1)
    k = (tensors["kc"] - tensors["kr"]).sum(-1)
    torch.testing.assert_close(out.logit, 0.8 * (u + k).detach())
    torch.testing.assert_close(out.logit, tdpo.logit.detach())
    mass = 2 * mask.sum(-1).float()  # Σ m over chosen and rejected, each mask
    torch.testing.assert_close(out.penalty, 1e-3 * mass + 1e-3 * mass)
