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
    exec(compile(_python_block("sparsepo_loss(stats, masks"), "README.md", "exec"), namespace)  # noqa: S102
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
