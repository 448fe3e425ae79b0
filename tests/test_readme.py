"""The README's code examples run as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    matches = [b for b in blocks if containing in b]
    assert len(matches) == 1, f"expected one README python block containing {containing!r}"
    return matches[0]


def test_bring_your_own_data_example_runs(tiny_tokenizer, tmp_path):
    namespace: dict = {}
    exec(compile(_python_block("class RankedAnswersDataModule"), "README.md", "exec"), namespace)  # noqa: S102
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
