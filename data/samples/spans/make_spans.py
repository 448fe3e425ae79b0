"""Write span-annotated pairs from the quickstart pairs: every word of a response that VADER's lexicon scores (a
sentiment-bearing word) becomes a character span with weight |valence| / 4 (VADER valences lie in [-4, 4]).

    python data/samples/spans/make_spans.py        # writes train.jsonl and val.jsonl next to this file

A small, reproducible example of the ``chosen_spans`` / ``rejected_spans`` columns (README, "Bring your own data"):
the spans mark the words that carry the sentiment preference, so ``configs/methods/spans.yaml`` trains DPO on
those words only. Deterministic: the same input gives the same files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[1] / "quickstart"
WORD = re.compile(r"[A-Za-z']+")


def spans(text: str, lexicon: dict[str, float]) -> list[list[float]]:
    """``[start, end, weight]`` for every lexicon word of ``text`` (character offsets into ``text``)."""
    out = []
    for match in WORD.finditer(text):
        valence = lexicon.get(match.group().lower())
        if valence:
            out.append([match.start(), match.end(), round(abs(valence) / 4.0, 4)])
    return out


def main() -> None:
    lexicon = SentimentIntensityAnalyzer().lexicon
    for split, limit in (("train", 128), ("val", 32)):
        rows = [json.loads(line) for line in (SOURCE / f"{split}.jsonl").read_text().splitlines()[:limit]]
        lines = []
        for row in rows:
            lines.append(json.dumps({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
                                     "chosen_spans": spans(row["chosen"], lexicon),
                                     "rejected_spans": spans(row["rejected"], lexicon)}, ensure_ascii=False))
        (HERE / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        print(f"{split}: {len(lines)} pairs")


if __name__ == "__main__":
    main()
