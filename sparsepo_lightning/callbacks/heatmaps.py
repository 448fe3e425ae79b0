"""Token heat-maps: validation responses with every token coloured by its reward mask and its KL mask.

``TokenHeatmaps`` captures the first ``num_pairs`` pairs of each rendered validation run from
``PreferenceModule.last_step`` (no extra forward pass), decodes them with the data module's tokenizer and writes

- one TensorBoard image per pair (``heatmaps/pair_{i}``; the step slider shows the masks over training), and
- one HTML page per validation run, ``<log_dir>/heatmaps/step_{global_step}.html`` (hover a token for its value).

Colours: reward mask in red, KL mask in blue, intensity ``m / vmax`` (``vmax`` fixed or the pair's maximum);
tokens whose mask is exactly 0 (the sparse ones, docs/method.md §5) are grey. With common masks one row per response.
Rendering uses Pillow only. With several ranks the pairs are rank 0's first validation pairs.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, ImageDraw, ImageFont

from sparsepo_lightning.callbacks.statistics import tensorboard_writers
from sparsepo_lightning.types import StepRecord

REWARD_RGB = (214, 39, 40)
KL_RGB = (31, 119, 180)
ZERO_RGB = (215, 215, 215)
"""Background of tokens whose mask is exactly zero."""


@dataclass
class MaskedResponse:
    """One response's tokens with their mask values (``kl`` is None when it is the reward mask)."""

    tokens: list[str]
    reward: list[float]
    kl: list[float] | None


@dataclass
class HeatmapPair:
    """A validation pair as decoded text pieces with per-token mask values."""

    prompt: str
    chosen: MaskedResponse
    rejected: MaskedResponse

    def vmax(self) -> float:
        values = [v for r in (self.chosen, self.rejected) for v in r.reward + (r.kl or [])]
        top = max(values, default=0.0)
        return top if top > 0 else 1.0


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))


def _token_text(tokenizer: Any, token_id: int) -> str:
    text = tokenizer.decode([token_id]) if tokenizer is not None else f"<{token_id}>"
    return text.replace("\n", "\\n").replace("\t", "\\t") or "∅"


def pairs_from_record(record: StepRecord, tokenizer: Any, limit: int, max_tokens: int) -> list[HeatmapPair]:
    """Decode up to ``limit`` pairs of a validation step with their masks (rows ``i`` and ``B + i``).

    Column ``t`` of the shifted layout weights the token ``input_ids[:, t + 1]`` (``types.py``), so the prompt is
    ``input_ids[row, : first_response_column + 1]``.
    """
    if record.masks is None:
        return []
    batch, masks = record.batch, record.masks
    _, response_mask = batch.shifted_labels()
    common = masks.kl.data_ptr() == masks.reward.data_ptr()
    ids, resp = batch.input_ids.cpu(), response_mask.cpu()
    reward, kl = masks.reward.float().cpu(), masks.kl.float().cpu()  # fp32 so tiny values stay non-zero

    def response(row: int) -> tuple[str, MaskedResponse]:
        cols = resp[row].nonzero().squeeze(-1)[:max_tokens]  # (n,)
        first = int(cols[0]) if len(cols) else 0
        tokens = [_token_text(tokenizer, int(i)) for i in ids[row, cols + 1]]
        values = MaskedResponse(tokens, reward[row, cols].tolist(), None if common else kl[row, cols].tolist())
        return _decode(tokenizer, ids[row, : first + 1].tolist()), values

    num_pairs = batch.num_pairs
    pairs = []
    for i in range(min(limit, num_pairs)):
        prompt, chosen = response(i)
        _, rejected = response(num_pairs + i)
        pairs.append(HeatmapPair(prompt, chosen, rejected))
    return pairs


def _panels(pair: HeatmapPair) -> list[tuple[str, list[str], list[float], tuple[int, int, int]]]:
    panels = []
    for side, r in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        panels.append((f"{side} · {'reward mask' if r.kl is not None else 'mask (common)'}", r.tokens, r.reward,
                       REWARD_RGB))
        if r.kl is not None:
            panels.append((f"{side} · KL mask", r.tokens, r.kl, KL_RGB))
    return panels


def _shade(value: float, vmax: float, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    if value == 0.0:
        return ZERO_RGB
    alpha = min(max(value / vmax, 0.0), 1.0)
    return tuple(round(255 + (c - 255) * alpha) for c in rgb)


def render_pair(pair: HeatmapPair, vmax: float | None = None, width: int = 960, font_size: int = 14) -> np.ndarray:
    """The pair as an RGB image ``(H, width, 3)`` uint8: the prompt, then one wrapped token row per mask."""
    font = ImageFont.load_default(size=font_size)
    vmax = vmax or pair.vmax()
    pad, line = 8, font_size + 8
    lines: list[tuple[int, list[tuple[int, int, str, tuple[int, int, int]]]]] = []  # (kind, items)
    header = f"prompt: {pair.prompt[-200:]!r}   colour scale: 0 … {vmax:.4g}   grey: exactly 0"
    lines.append((0, [(pad, 0, header, (0, 0, 0))]))
    for title, tokens, values, rgb in _panels(pair):
        lines.append((0, [(pad, 0, title, (0, 0, 0))]))
        x, items = pad, []
        for token, value in zip(tokens, values, strict=True):
            w = int(font.getlength(token)) + 4
            if x + w > width - pad and items:
                lines.append((1, items))
                x, items = pad, []
            items.append((x, w, token, _shade(value, vmax, rgb)))
            x += w + 1
        lines.append((1, items))
    image = Image.new("RGB", (width, pad * 2 + line * len(lines)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for n, (kind, items) in enumerate(lines):
        y = pad + n * line
        for x, w, text, colour in items:
            if kind == 0:
                draw.text((x, y + 3), text, fill=(60, 60, 60), font=font)
                continue
            draw.rectangle((x, y + 1, x + w, y + line - 2), fill=colour)
            draw.text((x + 2, y + 3), text, fill=(0, 0, 0), font=font)
    return np.asarray(image)


def render_html(pairs: list[HeatmapPair], step: int, vmax: float | None = None) -> str:
    """A standalone HTML page with every pair's tokens coloured like ``render_pair`` (hover shows ``m``)."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>token masks, step {step}</title>",
             "<style>body{font-family:sans-serif}span.t{white-space:pre-wrap;padding:1px 0;margin-right:1px}"
             ".p{color:#666}</style>", f"<h1>Token masks at step {step}</h1>",
             "<p>red: reward mask, blue: KL mask, intensity m / vmax; grey: exactly 0.</p>"]
    for i, pair in enumerate(pairs):
        scale = vmax or pair.vmax()
        parts.append(f"<h2>pair {i}</h2><p class='p'>{html.escape(pair.prompt)}</p>")
        for title, tokens, values, rgb in _panels(pair):
            spans = "".join(
                f"<span class='t' style='background:rgb{_shade(v, scale, rgb)}' title='m={v:.4g}'>"
                f"{html.escape(t)}</span>" for t, v in zip(tokens, values, strict=True))
            parts.append(f"<p><b>{html.escape(title)}</b> (0 … {scale:.4g})<br>{spans}</p>")
    return "\n".join(parts) + "\n"


def log_dir(trainer: Trainer) -> Path:
    """The logger's version directory, or the trainer's root directory without a logger."""
    logger = trainer.logger
    return Path(logger.log_dir if logger is not None and logger.log_dir else trainer.default_root_dir)


class TokenHeatmaps(Callback):
    """Render the first validation pairs with token colours from the reward and KL masks (module docstring)."""

    def __init__(self, num_pairs: int = 4, every_n_validations: int = 1, vmax: float | None = None,
                 max_tokens: int = 128, html_export: bool = True) -> None:
        """
        Args:
            num_pairs: pairs rendered (the first ones of the first validation dataloader, which is not shuffled).
            every_n_validations: render every N-th validation run (the sanity check does not count).
            vmax: mask value of full colour; default each pair's maximum (then compare shapes, not intensities,
                across steps).
            max_tokens: response tokens shown per response.
            html_export: also write ``<log_dir>/heatmaps/step_{global_step}.html``.
        """
        super().__init__()
        if num_pairs < 1 or every_n_validations < 1 or max_tokens < 1:
            raise ValueError("TokenHeatmaps: num_pairs, every_n_validations and max_tokens must be >= 1, got "
                             f"{num_pairs}, {every_n_validations}, {max_tokens}.")
        self.num_pairs, self.every_n_validations = num_pairs, every_n_validations
        self.vmax, self.max_tokens, self.html_export = vmax, max_tokens, html_export
        self._validations = 0
        self._pairs: list[HeatmapPair] = []

    def _due(self, trainer: Trainer) -> bool:
        return (not trainer.sanity_checking and trainer.is_global_zero
                and self._validations % self.every_n_validations == 0)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pairs = []

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx != 0 or len(self._pairs) >= self.num_pairs or not self._due(trainer):
            return
        record = getattr(pl_module, "last_step", None)
        if record is None or record.stage != "val":
            return
        if record.masks is None:
            rank_zero_warn("TokenHeatmaps: the objective uses no token masks; nothing to render.")
            return
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        with torch.no_grad():
            self._pairs += pairs_from_record(record, tokenizer, self.num_pairs - len(self._pairs), self.max_tokens)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        due, self._validations = self._due(trainer), self._validations + 1
        if not due or not self._pairs:
            return
        step = trainer.global_step
        for writer in tensorboard_writers(trainer):
            for i, pair in enumerate(self._pairs):
                writer.add_image(f"heatmaps/pair_{i}", render_pair(pair, self.vmax), step, dataformats="HWC")
        if self.html_export:
            path = log_dir(trainer) / "heatmaps" / f"step_{step}.html"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(render_html(self._pairs, step, self.vmax), encoding="utf-8")
        self._pairs = []
