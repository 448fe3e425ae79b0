"""What a study runs: settings, the runs of a plan, and the resolved ``sparsepo fit`` config of every run.

Every run of one seed trains the same initial policy (SmolLM2-135M-Instruct) on the same pairs in the same order
for the same number of steps; arms (``planfile.Arm``) differ only in the objective and the token weighting. A run is
keyed by a hash of its resolved config, so changing any setting makes a new run and never reuses a stale result.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparsepo_lightning.study.settings import StudySettings, substitute

if TYPE_CHECKING:
    from sparsepo_lightning.study.planfile import StudyPlan


@dataclass(frozen=True)
class Run:
    """One training run of the plan."""

    method: str
    beta: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}_b{self.beta:g}_s{self.seed}"


def arm_betas(study: StudyPlan, arm: str) -> tuple[float, ...]:
    """The β values an arm runs at (its own ``betas`` or the settings')."""
    return study.arms[arm].betas or study.settings.betas


def plan(study: StudyPlan) -> list[Run]:
    """Every run, in execution order: seed by seed, the middle β first, arms in plan order (a ``matches`` arm after
    the arm it copies, which the plan lists first)."""
    settings = study.settings
    every = sorted({b for arm in study.arms for b in arm_betas(study, arm)})
    middle = sorted(settings.betas)[len(settings.betas) // 2]
    betas = sorted(every, key=lambda b: (abs(b - middle), every.index(b)))
    runs = []
    for i, seed in enumerate(settings.seeds):
        for beta in betas:
            runs += [Run(name, beta, seed) for name, arm in study.arms.items()
                     if (i == 0 or arm.all_seeds) and beta in arm_betas(study, name)]
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


def training_config(study: StudyPlan, paths: Paths, run: Run,
                    matched: dict[str, float] | None = None) -> dict[str, Any]:
    """The resolved ``sparsepo fit`` config of a run (without the places it writes to)."""
    settings, arm = study.settings, study.arms[run.method]
    model: dict[str, Any] = {"model": settings.model, "objective": arm.objective_config(run.beta, run.seed)}
    masker = arm.masker_config(run.beta, run.seed, matched)
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
    config = {"seed_everything": run.seed, "trainer": trainer, "model": model, "data": data}
    for section, values in arm.overrides.items():
        target = config[section]["init_args"] if section == "data" else config[section]
        _merge(target, substitute(values, run.seed, run.beta, matched))
    return config


def _merge(target: dict[str, Any], values: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def config_key(config: dict[str, Any]) -> str:
    """A short hash of a resolved config (canonical JSON)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def settings_record(settings: StudySettings) -> dict[str, Any]:
    record = asdict(settings)
    record["betas"], record["seeds"] = list(settings.betas), list(settings.seeds)
    return record
