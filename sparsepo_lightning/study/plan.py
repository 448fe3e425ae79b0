"""What the sentiment study runs: settings, methods, and the resolved ``sparsepo fit`` config of every run.

Every run of one seed trains the same initial policy (SmolLM2-135M-Instruct) on the same pairs in the same order
for the same number of steps; methods differ only in the objective and the token weighting. A run is keyed by
a hash of its resolved config, so changing any setting makes a new run and never reuses a stale result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OBJECTIVES = "sparsepo_lightning.objectives"
MASKS = "sparsepo_lightning.masks"
RELEASED_L1 = 1e-3
"""λ_u = λ_d of the L1 arm: the released recipe's only L1 setting (HH, common mask; halved for a common mask)."""


@dataclass(frozen=True)
class StudySettings:
    """Sizes of the study. The defaults take about five hours of two CPU cores (the report states the measured cost).

    Attributes:
        model: initial policy and reference (an alias, a local checkpoint or a hub name).
        train_prompts: review openings sampled for training pairs (prompts that give no pair are skipped).
        heldout_prompts: review openings held out: evaluation prompts and validation/heat-map pairs.
        min_words, max_words: length of a review opening, in words.
        samples_per_prompt: continuations sampled and scored per prompt by the pair builder.
        max_new_tokens: continuation length, for the pairs and for evaluation samples.
        steps, batch_size: optimizer steps of every run and pairs per step (the first ``steps × batch_size`` pairs of
            the seeded shuffle of the training pairs).
        lr, mask_lr: policy and mask-network learning rates (constant after a 10 % warm-up, then cosine).
        betas: β of every method (one frontier point per β).
        seeds: seeds of the methods in ``Method.all_seeds``; the others run with the first seed only. A seed sets
            the data order and the mask initialisation/draws.
        eval_samples: completions per held-out prompt at evaluation (temperature 1).
        max_length, max_prompt_length: token limits of the training rows.
    """

    model: str = "smollm2-135m"
    train_prompts: int = 2100
    heldout_prompts: int = 200
    min_words: int = 4
    max_words: int = 8
    samples_per_prompt: int = 6
    max_new_tokens: int = 12
    steps: int = 64
    batch_size: int = 8
    lr: float = 2e-5
    mask_lr: float = 1e-3
    betas: tuple[float, ...] = (0.1, 0.3, 0.8)
    seeds: tuple[int, ...] = (0, 1)
    eval_samples: int = 4
    max_length: int = 40
    max_prompt_length: int = 24

    def data_key(self) -> dict[str, Any]:
        """The settings the built data depends on."""
        names = ("model", "train_prompts", "heldout_prompts", "min_words", "max_words", "samples_per_prompt",
                 "max_new_tokens")
        return {n: getattr(self, n) for n in names}


def _objective(name: str, beta: float, **extra: Any) -> dict[str, Any]:
    return {"class_path": f"{OBJECTIVES}.{name}", "init_args": {"beta": beta, **extra}}


def _learned(independent: bool, init: str) -> dict[str, Any]:
    return {"class_path": f"{MASKS}.LearnedMasker", "init_args": {"independent": independent, "init": init}}


@dataclass(frozen=True)
class Method:
    """One arm of the study.

    Attributes:
        label: name in tables and figures.
        objective: β -> objective config.
        masker: (β, seed, matched) -> masker config or None; ``matched`` holds the keep rate and value measured on
            the run this method is matched to (``matches``), else None.
        all_seeds: run every seed of the settings (else the first only).
        matches: the method whose measured sparsity this one copies (the random control), run first.
        learned: the masks are learned (sparsity curves, mask–valence correlation).
    """

    label: str
    objective: Callable[[float], dict[str, Any]]
    masker: Callable[[float, int, dict[str, float] | None], dict[str, Any] | None] = lambda b, s, m: None
    all_seeds: bool = False
    matches: str | None = None
    learned: bool = False


def _random_masker(beta: float, seed: int, matched: dict[str, float] | None) -> dict[str, Any]:
    if matched is None:
        raise ValueError("the random control needs the measured sparsity of the learned run it matches")
    return {"class_path": f"{MASKS}.RandomMasker",
            "init_args": {"keep_rate": matched["keep_rate"], "value": matched["value"], "seed": seed}}


METHODS: dict[str, Method] = {
    "dpo": Method("DPO", lambda b: _objective("DPO", b), all_seeds=True),
    "tdpo1": Method("TDPO1", lambda b: _objective("TDPO1", b), all_seeds=True),
    "tdpo2": Method("TDPO2", lambda b: _objective("TDPO2", b, alpha=0.5)),
    "mapo": Method("MaPO (activation masks)", lambda b: _objective("SparsePO", b),
                   lambda b, s, m: {"class_path": f"{MASKS}.ActivationMasker",
                                    "init_args": {"groups": ["mlp", "attn", "resid", "logits"],
                                                  "mapping": "zn_rescale"}}),
    "sparsepo_common": Method("SparsePO common (start 1)", lambda b: _objective("SparsePO", b),
                              lambda b, s, m: _learned(False, "ones"), all_seeds=True, learned=True),
    "random": Method("Random mask (matched)", lambda b: _objective("SparsePO", b), _random_masker, all_seeds=True,
                     matches="sparsepo_common"),
    "sparsepo_indep": Method("SparsePO independent (start 1)", lambda b: _objective("SparsePO", b),
                             lambda b, s, m: _learned(True, "ones"), learned=True),
    "sparsepo_common_released": Method("SparsePO common (released start)", lambda b: _objective("SparsePO", b),
                                       lambda b, s, m: _learned(False, "released"), learned=True),
    "sparsepo_indep_released": Method("SparsePO independent (released start)", lambda b: _objective("SparsePO", b),
                                      lambda b, s, m: _learned(True, "released"), learned=True),
    "sparsepo_common_l1": Method("SparsePO common + L1 (start 1)",
                                 lambda b: _objective("SparsePO", b, l1_reward=RELEASED_L1, l1_kl=RELEASED_L1),
                                 lambda b, s, m: _learned(False, "ones"), learned=True),
}
"""The arms, in the order they are run for each (seed, β)."""


@dataclass(frozen=True)
class Run:
    """One training run of the plan."""

    method: str
    beta: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}_b{self.beta:g}_s{self.seed}"


def plan(settings: StudySettings) -> list[Run]:
    """Every run, in execution order: seed by seed, the middle β first, each matched method after its source."""
    betas = sorted(settings.betas, key=lambda b: abs(b - sorted(settings.betas)[len(settings.betas) // 2]))
    runs = []
    for i, seed in enumerate(settings.seeds):
        for beta in betas:
            runs += [Run(m, beta, seed) for m, method in METHODS.items() if i == 0 or method.all_seeds]
    return runs


@dataclass
class Paths:
    """Where the study keeps things: small logs (committed) under ``out``, data and checkpoints under ``work``."""

    out: Path
    work: Path
    data: Path = field(init=False)

    def __post_init__(self) -> None:
        self.data = self.work / "data"

    @property
    def train_pairs(self) -> Path:
        return self.data / "train.jsonl"

    @property
    def heldout_pairs(self) -> Path:
        return self.data / "heldout.jsonl"

    @property
    def heldout_prompts(self) -> Path:
        return self.data / "heldout_prompts.txt"

    def run_dir(self, run: Run, key: str) -> Path:
        return self.out / "runs" / f"{run.name}-{key}"


def training_config(settings: StudySettings, paths: Paths, run: Run,
                    matched: dict[str, float] | None = None) -> dict[str, Any]:
    """The resolved ``sparsepo fit`` config of a run (without the places it writes to)."""
    method = METHODS[run.method]
    model: dict[str, Any] = {"model": settings.model, "objective": method.objective(run.beta)}
    masker = method.masker(run.beta, run.seed, matched)
    if masker is not None:
        model["masker"] = masker
    model.update(lr=settings.lr, mask_lr=settings.mask_lr, mask_weight_decay=0.01, warmup_ratio=0.1,
                 schedule="cosine", chunk_size=1024)
    data = {"class_path": "sparsepo_lightning.data.PreferenceDataModule",
            "init_args": {"train_file": str(paths.train_pairs), "val_file": str(paths.heldout_pairs),
                          "use_chat_template": False, "max_length": settings.max_length,
                          "max_prompt_length": settings.max_prompt_length, "batch_size": settings.batch_size,
                          "seed": run.seed}}
    trainer = {"accelerator": "auto", "devices": 1, "precision": "32-true", "max_epochs": 1,
               "limit_train_batches": settings.steps, "log_every_n_steps": 1, "gradient_clip_val": 1.0,
               "num_sanity_val_steps": 0, "enable_progress_bar": False}
    return {"seed_everything": run.seed, "trainer": trainer, "model": model, "data": data}


def config_key(config: dict[str, Any]) -> str:
    """A short hash of a resolved config (canonical JSON)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def settings_record(settings: StudySettings) -> dict[str, Any]:
    record = asdict(settings)
    record["betas"], record["seeds"] = list(settings.betas), list(settings.seeds)
    return record
