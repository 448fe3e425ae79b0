"""A study plan as a YAML file: its arms, β values, seeds, sizes, evaluation points, scorers and comparisons.

``load_plan(path)`` reads and checks a plan; every error names the file, the line, the key and the fix. A plan::

    name: sentiment_controls          # the report folder: reports/<name>
    title: Does the choice of tokens matter?
    statistics: hierarchical          # or prompt_bootstrap (the first study's report)
    settings: {steps: 64, betas: [0.1, 0.3], seeds: [0, 1, 2], ...}   # StudySettings fields
    evaluations: 2                    # checkpoints evaluated per run, evenly spaced (the last at the final step)
    scorers: [vader, textblob]        # the first scores the frontier, the second is the robustness check
    arms:
      dpo: {label: DPO, objective: DPO}
      mine:
        label: My masker
        objective: SparsePO
        masker: {class_path: my_package.MyMasker, init_args: {k: 0.5, seed: $seed}}
      mine_permuted: {label: "My masker, permuted", control_of: mine, control: PermutedControl}
    comparisons:
      - {a: mine, b: mine_permuted, question: Does my masker's choice of tokens matter?}

Short class names resolve to ``sparsepo_lightning.objectives`` (objectives), ``sparsepo_lightning.masks`` (maskers)
and ``sparsepo_lightning.masks.controls`` (controls); anything else is a dotted path. ``$seed`` and ``$beta`` in
``init_args`` become the run's seed and β; ``$matched.keep_rate`` / ``$matched.value`` the sparsity measured on the
arm named by ``matches`` (the first study's constant-mask arm).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparsepo_lightning.study.settings import StudySettings, substitute

OBJECTIVES = "sparsepo_lightning.objectives"
MASKS = "sparsepo_lightning.masks"
CONTROLS = "sparsepo_lightning.masks.controls"
STATISTICS = ("prompt_bootstrap", "hierarchical")
"""``prompt_bootstrap``: the first study's report (prompts resampled, pooled fronts, uncorrected); ``hierarchical``:
seeds then prompts resampled, per-seed fronts over a fixed KL range, Holm across the listed comparisons."""
PLAN_KEYS = ("name", "title", "task", "statistics", "settings", "evaluations", "scorers", "bootstrap", "arms",
             "comparisons", "pilot")
ARM_KEYS = ("label", "objective", "masker", "control", "control_of", "matches", "seeds", "betas", "overrides",
            "learned")
COMPARISON_KEYS = ("a", "b", "question", "kl_max")


class PlanError(ValueError):
    """A plan file that cannot be used; the message names the file, line, key and fix."""


DEFAULT_PLAN = Path(__file__).resolve().parents[2] / "configs" / "study" / "sentiment.yaml"
"""The first study's plan (42 runs, ``reports/sentiment``), in the repository's ``configs/study/``."""


@dataclass(frozen=True)
class Arm:
    """One arm: an objective and a token weighting (optionally wrapped in a control), run at every β and seed.

    Attributes:
        name: the key in ``arms`` (run names, log folders).
        label: name in tables and figures.
        objective: ``{"class_path", "init_args"}`` without β (added per run).
        masker: the masker config or None (no mask: DPO-style objectives).
        control: class path of the control wrapping ``masker`` (``PermutedControl`` ...), or None. An arm with
            ``control_of: <arm>`` copies that arm's objective and masker, and its seeds, β values and overrides
            unless it sets its own.
        matches: the arm whose measured mask sparsity fills ``$matched.*`` (run first).
        all_seeds: run every seed of the settings (``seeds: all``, the default) or the first only (``first``).
        betas: this arm's β values (default the settings' ``betas``).
        overrides: merged into the run's training config (``{"model": {"mask_lr": 0.01}}``).
        learned: its masks are learned (sparsity curves, mask–valence correlation).
    """

    name: str
    label: str
    objective: dict[str, Any]
    masker: dict[str, Any] | None = None
    control: str | None = None
    matches: str | None = None
    all_seeds: bool = True
    betas: tuple[float, ...] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    learned: bool = False

    def objective_config(self, beta: float, seed: int) -> dict[str, Any]:
        init_args = {"beta": beta, **substitute(self.objective.get("init_args", {}), seed, beta, None)}
        return {"class_path": self.objective["class_path"], "init_args": init_args}

    def masker_config(self, beta: float, seed: int, matched: dict[str, float] | None) -> dict[str, Any] | None:
        if self.masker is None:
            return None
        if self.matches is not None and matched is None:
            raise ValueError(f"arm {self.name} needs the measured sparsity of the {self.matches} run it matches")
        masker = {"class_path": self.masker["class_path"]}
        if "init_args" in self.masker:
            masker["init_args"] = substitute(self.masker["init_args"], seed, beta, matched)
        if self.control is None:
            return masker
        return {"class_path": self.control, "init_args": {"masker": masker, "seed": seed}}


@dataclass(frozen=True)
class Comparison:
    """A pre-registered comparison: frontier score of arm ``a`` minus arm ``b``.

    Attributes:
        question: what it answers, in words (the report states the verdict under it).
        kl_max: the KL range [0, kl_max] it is scored over; None: the largest KL every seed's front of both arms
            reaches in the full data, fixed before resampling.
    """

    a: str
    b: str
    question: str
    kl_max: float | None = None


@dataclass(frozen=True)
class StudyPlan:
    """A parsed plan file (see the module docstring)."""

    name: str
    title: str
    settings: StudySettings
    arms: dict[str, Arm]
    comparisons: tuple[Comparison, ...] = ()
    task: str = "sentiment"
    statistics: str = "hierarchical"
    evaluations: int = 1
    scorers: tuple[str, ...] = ("vader", "textblob")
    bootstrap: int = 1000
    pilot: str | None = None
    record: dict[str, Any] = field(default_factory=dict, compare=False)
    """The plan as written (kept in ``study.json`` so the report reads the plan the runs were made with)."""

    def eval_steps(self, steps: int | None = None) -> list[int]:
        """The evaluated steps of a run of ``steps`` steps: ``evaluations`` points evenly spaced, the last the final."""
        steps = self.settings.steps if steps is None else steps
        return sorted({max(1, round(steps * k / self.evaluations)) for k in range(1, self.evaluations + 1)})

    def with_settings(self, **overrides: Any) -> StudyPlan:
        """The plan with some settings replaced (the ``--steps``/``--seeds``/... flags)."""
        return dataclasses.replace(self, settings=dataclasses.replace(self.settings, **overrides))


# ---- parsing -----------------------------------------------------------------------------------------------
class _Where:
    """Line numbers of the keys of a YAML document, for error messages."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        try:
            self.root = yaml.compose(text)
        except yaml.YAMLError:
            self.root = None

    def line(self, *keys: str | int) -> int | None:
        node, line = self.root, None
        for key in keys:
            if isinstance(node, yaml.MappingNode):
                match = next(((k, v) for k, v in node.value if k.value == key), None)
                if match is None:
                    return line
                line, node = match[0].start_mark.line + 1, match[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
                line = node.start_mark.line + 1
            else:
                return line
        return line

    def error(self, keys: tuple[str | int, ...], problem: str, fix: str) -> PlanError:
        line = self.line(*keys)
        where = f"{self.path}" + (f", line {line}" if line else "")
        key = ".".join(str(k) for k in keys) or "(top level)"
        return PlanError(f"{where}: {key}: {problem}. Fix: {fix}")


def load_plan(path: str | Path) -> StudyPlan:
    """Read and check a plan file.

    Raises:
        PlanError: the file is missing, not YAML, or a key is unknown, missing or of the wrong kind (the message
            names the file, the line, the key and the fix).
    """
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: no such plan file. Fix: give an existing file to --plan (configs/study/ holds the "
                        "shipped plans).")
    text = path.read_text(encoding="utf-8")
    where = _Where(path, text)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PlanError(f"{path}: not valid YAML ({error}). Fix: check the indentation and quoting there.") from None
    return parse_plan(raw, where)


def plan_from_record(record: dict[str, Any], source: str = "study.json") -> StudyPlan:
    """A plan from its record in ``study.json`` (what ``StudyPlan.record`` holds)."""
    text = yaml.safe_dump(record, sort_keys=False)
    return parse_plan(record, _Where(Path(source), text))


def parse_plan(raw: Any, where: _Where) -> StudyPlan:
    """Check a loaded plan document (see ``load_plan``)."""
    if not isinstance(raw, dict):
        raise where.error((), "the plan must be a mapping of keys", "start from configs/study/sentiment_controls.yaml")
    _check_keys(raw, PLAN_KEYS, (), where)
    for key in ("name", "settings", "arms"):
        if key not in raw:
            raise where.error((key,), "missing", f"add `{key}:` (see configs/study/sentiment_controls.yaml)")
    settings = _settings(raw["settings"], where)
    arms_raw = raw["arms"]
    if not isinstance(arms_raw, dict) or not arms_raw:
        raise where.error(("arms",), "must map arm names to their entries", "`arms: {dpo: {objective: DPO}}`")
    arms = {name: _arm(name, entry, arms_raw, where) for name, entry in arms_raw.items()}
    comparisons = tuple(_comparison(i, c, arms, where) for i, c in enumerate(raw.get("comparisons") or []))
    statistics = raw.get("statistics", "hierarchical")
    if statistics not in STATISTICS:
        raise where.error(("statistics",), f"unknown value {statistics!r}", f"one of {', '.join(STATISTICS)}")
    evaluations = _integer(raw.get("evaluations", 1), ("evaluations",), where)
    bootstrap = _integer(raw.get("bootstrap", 1000), ("bootstrap",), where)
    scorers = raw.get("scorers", ["vader", "textblob"])
    if not isinstance(scorers, list) or not 1 <= len(scorers) <= 2 or not all(isinstance(s, str) for s in scorers):
        raise where.error(("scorers",), f"{scorers!r} is not a list of one or two scorer names",
                          "`scorers: [vader, textblob]` (the first scores the frontier; a classifier name works too)")
    if evaluations > settings.steps:
        raise where.error(("evaluations",), f"{evaluations} evaluations for {settings.steps} steps",
                          "at most one evaluation per step")
    return StudyPlan(name=str(raw["name"]), title=str(raw.get("title", raw["name"])), settings=settings, arms=arms,
                     comparisons=comparisons, task=str(raw.get("task", "sentiment")), statistics=statistics,
                     evaluations=evaluations, scorers=tuple(scorers), bootstrap=bootstrap,
                     pilot=raw.get("pilot"), record=json.loads(json.dumps(raw)))


def _check_keys(entry: dict[str, Any], allowed: tuple[str, ...], keys: tuple[str | int, ...], where: _Where) -> None:
    for key in entry:
        if key not in allowed:
            raise where.error((*keys, key), "unknown key", f"one of {', '.join(allowed)}")


def _integer(value: Any, keys: tuple[str | int, ...], where: _Where) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise where.error(keys, f"{value!r} is not a positive integer", "a whole number ≥ 1")
    return value


def _settings(raw: Any, where: _Where) -> StudySettings:
    if not isinstance(raw, dict):
        raise where.error(("settings",), "must be a mapping", "`settings: {steps: 64, betas: [0.1], seeds: [0]}`")
    defaults = StudySettings()
    values = {}
    for key, value in raw.items():
        if not hasattr(defaults, key):
            names = ", ".join(f.name for f in dataclasses.fields(StudySettings))
            raise where.error(("settings", key), "unknown setting", f"one of {names}")
        default = getattr(defaults, key)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not value or not all(isinstance(v, int | float) for v in value):
                raise where.error(("settings", key), f"{value!r} is not a list of numbers", f"e.g. `{key}: "
                                  f"{list(default)}`")
            value = tuple(type(default[0])(v) for v in value)
        elif isinstance(default, float) and isinstance(value, int | float) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, type(default)) or isinstance(value, bool):
            raise where.error(("settings", key), f"{value!r} is not a {type(default).__name__}",
                              f"e.g. `{key}: {default}`")
        values[key] = value
    return StudySettings(**values)


def _class(spec: Any, package: str, keys: tuple[str | int, ...], where: _Where, what: str) -> dict[str, Any]:
    """``Name`` or ``{class_path, init_args}`` -> a config with a full dotted class path."""
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str) or \
            set(spec) - {"class_path", "init_args"} or not isinstance(spec.get("init_args", {}), dict):
        raise where.error(keys, f"{spec!r} is not a {what}", f"a class name (`{what}: SparsePO`) or "
                          "`{class_path: pkg.Class, init_args: {...}}`")
    path = spec["class_path"] if "." in spec["class_path"] else f"{package}.{spec['class_path']}"
    return {"class_path": path, **({"init_args": spec["init_args"]} if "init_args" in spec else {})}


def _arm(name: str, entry: Any, arms: dict[str, Any], where: _Where) -> Arm:
    keys: tuple[str | int, ...] = ("arms", name)
    if not isinstance(entry, dict):
        raise where.error(keys, "an arm must be a mapping", "`{label: ..., objective: ..., masker: ...}`")
    _check_keys(entry, ARM_KEYS, keys, where)
    source = entry
    if "control_of" in entry:
        other = entry["control_of"]
        if other not in arms or other == name or "control_of" in arms[other]:
            raise where.error((*keys, "control_of"), f"{other!r} is not another (uncontrolled) arm of the plan",
                              "the name of the arm whose objective and masker this control wraps")
        if "objective" in entry or "masker" in entry:
            raise where.error((*keys, "control_of"), "given together with objective/masker",
                              "either control_of (copy that arm's) or objective + masker")
        if "control" not in entry:
            raise where.error((*keys, "control"), "missing for a control_of arm",
                              "`control: PermutedControl` (or ResponseMeanControl, BernoulliControl)")
        source = arms[other]
        keys_of_source: tuple[str | int, ...] = ("arms", other)
    else:
        keys_of_source = keys
    if "objective" not in source:
        raise where.error((*keys_of_source, "objective"), "missing", "`objective: DPO` (or SparsePO, TDPO1, ...)")
    objective = _class(source["objective"], OBJECTIVES, (*keys_of_source, "objective"), where, "objective")
    masker = None if source.get("masker") is None else \
        _class(source["masker"], MASKS, (*keys_of_source, "masker"), where, "masker")
    control = None
    if entry.get("control") is not None:
        if masker is None:
            raise where.error((*keys, "control"), "a control needs a masker to wrap", "add `masker:` or `control_of:`")
        control = _class(entry["control"], CONTROLS, (*keys, "control"), where, "control")["class_path"]
    matches = entry.get("matches")
    if matches is not None and (matches not in arms or matches == name):
        raise where.error((*keys, "matches"), f"{matches!r} is not another arm", "the name of an arm of this plan")
    if matches is None and "$matched." in json.dumps(source.get("masker")):
        raise where.error((*keys, "masker"), "uses $matched.* without `matches:`", "add `matches: <arm>`")
    # a control differs from its arm by token choice only: it inherits the arm's seeds, β values and overrides
    inherited = {k: source[k] for k in ("seeds", "betas", "overrides") if k in source and source is not entry}
    entry = {**inherited, **entry}
    seeds = entry.get("seeds", "all")
    if seeds not in ("all", "first"):
        raise where.error((*keys, "seeds"), f"{seeds!r}", "`seeds: all` (every seed) or `seeds: first`")
    betas = entry.get("betas")
    if betas is not None:
        if not isinstance(betas, list) or not betas or not all(isinstance(b, int | float) and b > 0 for b in betas):
            raise where.error((*keys, "betas"), f"{betas!r} is not a list of positive numbers", "`betas: [0.1, 0.5]`")
        betas = tuple(float(b) for b in betas)
    overrides = entry.get("overrides", {})
    if not isinstance(overrides, dict) or set(overrides) - {"model", "trainer", "data"}:
        raise where.error((*keys, "overrides"), "must map model/trainer/data to settings",
                          "`overrides: {model: {mask_lr: 0.01}}`")
    learned = entry.get("learned", masker is not None and control is None and
                        masker["class_path"].endswith("LearnedMasker"))
    return Arm(name=name, label=str(entry.get("label", name)), objective=objective, masker=masker, control=control,
               matches=matches, all_seeds=seeds == "all", betas=betas, overrides=overrides, learned=bool(learned))


def _comparison(index: int, entry: Any, arms: dict[str, Arm], where: _Where) -> Comparison:
    keys: tuple[str | int, ...] = ("comparisons", index)
    if not isinstance(entry, dict):
        raise where.error(keys, "a comparison must be a mapping", "`{a: arm, b: other_arm, question: ...}`")
    _check_keys(entry, COMPARISON_KEYS, keys, where)
    for side in ("a", "b"):
        if entry.get(side) not in arms:
            raise where.error((*keys, side), f"{entry.get(side)!r} is not an arm of the plan",
                              f"one of {', '.join(arms)}")
    if entry["a"] == entry["b"]:
        raise where.error(keys, "compares an arm with itself", "two different arms")
    kl_max = entry.get("kl_max")
    if kl_max is not None and not (isinstance(kl_max, int | float) and kl_max > 0):
        raise where.error((*keys, "kl_max"), f"{kl_max!r} is not a positive number", "e.g. `kl_max: 1.0`, or drop "
                          "it to use the range every seed reaches")
    question = entry.get("question") or f"{arms[entry['a']].label} vs {arms[entry['b']].label}"
    return Comparison(entry["a"], entry["b"], str(question), None if kl_max is None else float(kl_max))
