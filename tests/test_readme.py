"""The README stays a three-screen front page: at most 250 lines and 3,000 words, with the sections a newcomer
looks for, and links only to files that exist. (Its fenced blocks follow the docs rule: ``tests/test_docs.py``;
its quickstart summary equals the recorded run: ``tests/test_quickstart.py``.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES, MAX_WORDS = 250, 3000


def test_readme_is_at_most_250_lines_and_3000_words():
    text = README.read_text()
    lines, words = len(text.splitlines()), len(text.split())
    assert lines <= MAX_LINES, f"README.md has {lines} lines > {MAX_LINES}: move a section into docs/"
    assert words <= MAX_WORDS, f"README.md has {words} words > {MAX_WORDS}: move a section into docs/"


def test_readme_has_the_front_page_sections():
    headings = re.findall(r"^#{2,3} (.+)$", README.read_text(), flags=re.M)
    for wanted in ("Install", "The quickstart", "Use it", "Objectives and masks", "Token-level methods as plug-ins",
                   "The paper's tasks", "Documentation"):
        assert wanted in headings, f"README: no '{wanted}' section"


def test_readme_links_and_pictures_point_to_files_that_exist():
    text = README.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert local, "README links to no page of the project"
    for target in local:
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_readme_quotes_the_target_sparsity_runs_from_their_results_file():
    """The README's target-sparsity table is the generated one (``benchmarks/tables.py``, checked against the file
    by tests/test_benchmark_tables.py), and the file records both targets."""
    import json

    results = json.loads((ROOT / "benchmarks" / "results" / "sparsity.json").read_text())
    assert {e["target_sparsity"] for e in results.values()} == {0.5, 0.8}
    assert "<!-- table: sparsity -->" in README.read_text()
