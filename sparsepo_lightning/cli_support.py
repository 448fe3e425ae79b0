"""What the ``sparsepo`` command adds to LightningCLI: one-paragraph parse errors (which file and line, "did you
mean"), checks that run before any model loads (``--ckpt_path``, output folders), a progress bar that counts steps
for step-bounded runs (``progress``), and quieter Lightning console output."""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser

from sparsepo_lightning.commands import plain_text
from sparsepo_lightning.errors import ConfigError, MissingFileError, OutputExistsError
from sparsepo_lightning.run_identity import check_resume, choose_last, identity_settings

ARGV: list[str] = []
"""The arguments being parsed (set by the CLI before parsing), to find the config files an error comes from."""
START_DIR: list[str] = [os.getcwd()]
"""The working directory the arguments are relative to (jsonargparse changes it while it reads a config file)."""

OPTIMIZER_FIX = (
    "the optimizer is set in one place, the model: --model.optimizer CLASS (e.g. --model.optimizer torch.optim.SGD) "
    "with --model.lr, --model.mask_lr, --model.weight_decay, --model.warmup_ratio and --model.schedule. The module "
    "builds the parameter groups (policy, no-decay, masks with their own learning rate) and the warm-up schedule "
    "itself; a top-level --optimizer/--lr_scheduler would replace both."
)


class SparsePOArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` whose errors are one message with the place and the fix, not a usage dump.

    ``JSONARGPARSE_DEBUG=1`` (set by ``--debug``) keeps jsonargparse's own behaviour: raise with the traceback.
    """

    def format_help(self) -> str:
        """A subcommand's help with the project's own options first: the ``model`` and ``data`` groups and the
        subcommand's own (``--ckpt_path``) before Lightning's ``trainer`` group, a usage line that names the groups
        instead of listing every trainer flag, and no reST markup (double backquotes, roles) in the text."""
        trainer = getattr(self, "groups", {}).get("trainer")
        if trainer is None:
            return plain_text(super().format_help())
        groups, usage = self._action_groups, self.usage
        self._action_groups = [g for g in groups if g is not trainer] + [trainer]
        self.usage = "%(prog)s [-c CONFIG] [--model.* ...] [--data CLASS_PATH] [--data.* ...]\n" + " " * (
            len(self.prog) + 8) + "[--ckpt_path CKPT_PATH] [--trainer.* ...]"
        try:
            return plain_text(super().format_help())
        finally:
            self._action_groups, self.usage = groups, usage

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        from jsonargparse._common import debug_mode_active  # the switch jsonargparse itself reads

        if not self.exit_on_error or debug_mode_active():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {explain(message, parser, ARGV)}\n"
                         f"All options: {prog} --help (--debug shows the traceback).\n")  # fmt: skip
        sys.exit(2)


def explain(message: str, parser: Any, argv: list[str]) -> str:
    """jsonargparse's error ``message`` rewritten: the bad key, the file and line it is in, a "did you mean"."""
    unknown = re.search(r"unrecognized arguments: (.*)", message)
    if unknown:
        keys = [a[2:].split("=")[0] for a in unknown.group(1).split() if a.startswith("--")]
        if any(k.split(".")[0] in ("optimizer", "lr_scheduler") for k in keys):
            return f"unknown option --{keys[0]}: {OPTIMIZER_FIX}"
        return "; ".join(_unknown_key(k, _option_names(parser), argv, "option --") for k in keys) or message
    not_accepted = re.search(r"does not accept option '([^']+)'", message)
    if not_accepted:
        return _unknown_key(not_accepted.group(1), _option_names(parser), argv, "key ")
    nested = re.search(r"Parser key \"([^\"]+)\".*?class_path '([^']+)':\s*Option '([^']+)' is not accepted",
                       message, flags=re.S)  # fmt: skip
    if nested:
        group, class_path, key = nested.groups()
        return _unknown_key(f"{group}.init_args.{key}", _init_parameters(class_path, f"{group}.init_args."), argv,
                            "key ", f" (not a parameter of {class_path})")  # fmt: skip
    bad_class = re.search(r"Problem with given class_path '([^']+)':\s*(.+)", message)
    if bad_class:
        key = re.search(r'Parser key "([^"]+)"', message)
        return class_path_error(bad_class.group(1), bad_class.group(2).strip(), key.group(1) if key else None)
    if "Problems parsing config" in message and "<unicode string>" in message:
        broken = next((f for f in config_files(argv) if not _parses(f)), None)
        if broken is not None:
            return message.replace('"<unicode string>"', broken) + f"\nFix: correct the YAML syntax of {broken}."
    return message


def class_path_error(class_path: str, reason: str, key: str | None) -> str:
    """A ``class_path`` that does not import, as one message: why, "did you mean" (classes of that name, or close
    names, in the package's source files, found without importing them) and the ``PYTHONPATH`` fix."""
    import importlib.util

    module, _, name = class_path.rpartition(".")
    top = class_path.split(".")[0]
    text = f"{key or 'class_path'}: cannot use class_path {class_path!r} ({reason.splitlines()[0]})."
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return (text + f" Fix: the module {module!r} must be importable from {START_DIR[0]}: run from the folder that "
                f"holds {top}/ (or {top}.py), or add that folder to PYTHONPATH (PYTHONPATH=/path/to/it sparsepo ...).")
    classes = _classes_in(Path(next(iter(spec.submodule_search_locations))), top)
    same = sorted(c for c in classes if c.rsplit(".", 1)[1] == name)
    close = same or difflib.get_close_matches(class_path, classes, n=2, cutoff=0.75)
    if close:
        return text + f" Did you mean {' or '.join(repr(c) for c in close)}? Fix: use the full module path."
    return text + " Fix: check the module and class name (see --help for the classes each option accepts)."


def _classes_in(folder: Path, package: str) -> list[str]:
    """``package.module.Class`` for every top-level ``class`` statement in the package's source files."""
    found = []
    for file in folder.rglob("*.py"):
        parts = file.relative_to(folder).with_suffix("").parts
        module = ".".join((package, *(p for p in parts if p != "__init__")))
        try:
            names = re.findall(r"^class (\w+)\b", file.read_text(errors="replace"), flags=re.M)
        except OSError:
            continue
        found += [f"{module}.{n}" for n in names if not n.startswith("_")]
    return found


def plugin_error(error: BaseException) -> str | None:
    """A configured class's own argument check (a ``ValueError``/``TypeError`` raised by its ``__init__`` while the CLI
    builds it, which jsonargparse wraps in "Does not validate ...") as one message with the option to change."""
    for _ in range(20):
        if error is None:
            return None
        cause = error.__cause__
        if "Does not validate" in str(error) and isinstance(cause, ValueError | TypeError):
            given = re.search(r"class_path='([^']+)'", str(error))
            class_path = given.group(1) if given else "a configured class"
            where = _class_path_location(class_path)
            told = str(cause).rstrip()
            return (f"{class_path} refused its arguments: {told}" + ("" if told.endswith(".") else ".")
                    + (" Change" if "Fix:" in told else " Fix: change") + f" its init_args"
                    f"{' (' + where + ')' if where else ''}: in the config file, or --<option>.init_args.NAME VALUE.")
        error = cause or error.__context__
    return None


def _class_path_location(class_path: str) -> str | None:
    """Where ``class_path`` is chosen: a command-line option, or ``file:line`` of a config file."""
    for i, arg in enumerate(ARGV[:-1]):
        if arg.startswith("--") and ARGV[i + 1] == class_path:
            return f"{arg[2:].removesuffix('.class_path')}, chosen on the command line"
    for file, number, line in _config_lines(ARGV):
        if re.search(rf"class_path:\s*{re.escape(class_path)}\s*(#.*)?$", line):
            return f"chosen at {file}:{number}"
    return None


def _parses(file: str) -> bool:
    import yaml

    try:
        yaml.safe_load(_path(file).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return True


RENAMED = {"model.gradient_checkpointing": "model.activation_checkpointing"}
"""Options that were renamed: old key → new key (an old config gets the new name in its error)."""


def _unknown_key(key: str, candidates: list[str], argv: list[str], kind: str, why: str = "") -> str:
    where = _locate(key.split(".")[-1], argv)
    text = f"unknown {kind}{key}{why}" + (f" in {where}" if where else " on the command line")
    if key in RENAMED:
        leaf = RENAMED[key].split(".")[-1]
        return text + (f": it is now {RENAMED[key]!r} (one checkpointing option). Fix: rename it to {leaf!r}"
                       + (f" in {where}." if where else "."))
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if match:
        leaf = match[0].split(".")[-1]
        return text + f". Did you mean {match[0]!r}? Fix: rename it to {leaf!r}" + (f" in {where}." if where else ".")
    return text + ". Fix: remove it, or see --help for the accepted options."


def _option_names(parser: Any) -> list[str]:
    names = {a.dest for a in getattr(parser, "_actions", []) if isinstance(getattr(a, "dest", None), str)}
    return sorted(n for n in names if n not in ("help", "config"))


def _init_parameters(class_path: str, prefix: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(__import__(module, fromlist=[name]), name)
        return [prefix + p for c in cls.__mro__ if c is not object for p in inspect.signature(c.__init__).parameters
                if p not in ("self", "args", "kwargs")]  # fmt: skip
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def config_files(argv: list[str]) -> list[str]:
    """The ``--config`` / ``-c`` files in ``argv``, in order."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _path(file: str) -> Path:
    return Path(START_DIR[0], file)


def _locate(leaf: str, argv: list[str]) -> str | None:
    """``file:line`` of the last config file in ``argv`` that has ``leaf:`` as a YAML key, if any."""
    pattern = re.compile(rf"^\s*(-\s+)?{re.escape(leaf)}\s*:")
    found, done = None, set()
    for file, number, line in _config_lines(argv):
        if file not in done and pattern.match(line):
            found = f"{file}:{number}"
            done.add(file)  # the first match in each file; the last file wins
    return found


def mentions(key: str, argv: list[str]) -> bool:
    """Whether ``key`` is set on the command line or in one of its ``--config`` files."""
    return any(key in a for a in argv) or any(re.match(rf"^\s*{re.escape(key)}\s*:", line)
                                              for _, _, line in _config_lines(argv))


def _config_lines(argv: list[str]):  # noqa: ANN202 (a generator of (file, line number, line))
    """``(file, line number, line)`` of every line of the ``--config`` files in ``argv`` that can be read."""
    for file in config_files(argv):
        try:
            lines = _path(file).read_text().splitlines()
        except OSError:
            continue
        for number, line in enumerate(lines, 1):
            yield file, number, line


def check_before_loading(config: Namespace, subcommand: str) -> None:
    """Checks that need no model: ``--ckpt_path`` exists and, for ``fit``, belongs to this run identity (or
    ``--resume_anyway``); ``last`` is resolved here to the newest checkpoint of this run identity
    (:func:`~sparsepo_lightning.run_identity.choose_last`) and written back into ``config``; the log folder is
    writable and a checkpoint folder of its own (``RunCheckpoint`` ``dirpath``) holds no other run's files."""
    logger = config.get("trainer", {}).get("logger")
    run_dir = None
    if isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
        init = logger.get("init_args", {})
        save_dir = Path(str(init.get("save_dir") or "runs"))
        run_dir = save_dir / str(init.get("name") or "lightning_logs")
        existing = next((p for p in (save_dir, *save_dir.parents) if p.exists()), None)
        if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK)):
            raise ConfigError(f"trainer.logger.init_args.save_dir={save_dir}: {existing} is not a writable folder. "
                              "Fix: --trainer.logger.init_args.save_dir DIR with a folder you can write to.")
    ckpt_path = config.get("ckpt_path")
    callbacks = config.get("trainer", {}).get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    if subcommand == "fit":
        _check_checkpoint_dirs(callbacks, ckpt_path)
    if ckpt_path in (None, "best", "hpc", "registry") or str(ckpt_path).startswith("registry:"):
        return
    own_dirs = [Path(str(c.init_args.dirpath)) for c in callbacks if isinstance(c, Namespace)
                and str(c.get("class_path")).endswith("Checkpoint") and (c.get("init_args") or {}).get("dirpath")]
    settings = identity_settings(config)
    resume_anyway = bool(config.get("resume_anyway"))
    if ckpt_path == "last":
        if own_dirs:  # a checkpoint callback with its own folder resumes from there only
            where = " or ".join(f"{d}/last*.ckpt" for d in own_dirs)
            found = sorted((str(p) for d in own_dirs for p in d.glob("last*.ckpt") if p.exists()),
                           key=os.path.getmtime)
        else:
            where = f"{run_dir}/version_*/checkpoints/last*.ckpt" if run_dir is not None else ""
            found = _last_checkpoints(run_dir) if run_dir is not None else []
        if run_dir is None and not own_dirs:  # another logger: RunCheckpoint looks for `last` itself
            return
        if found:  # resolved here, to the newest checkpoint of this run identity
            config["ckpt_path"] = choose_last(found, settings, resume_anyway)
            return
        links = ([p for d in own_dirs for p in d.glob("last*.ckpt")] if own_dirs
                 else list(run_dir.glob("*/checkpoints/last*.ckpt")))  # fmt: skip
        broken = sorted(str(p) for p in links if not p.exists())
        raise MissingFileError(f"--ckpt_path last: no last checkpoint at {where}"
            + (f" (broken links: {', '.join(broken)})" if broken else "") + ". Fix: check the run to resume "
            "(trainer.logger save_dir/name, or the checkpoint callback's dirpath), give a checkpoint file with "
            "--ckpt_path PATH, or drop --ckpt_path (fit: start from scratch)."
        )
    if not Path(ckpt_path).exists():
        runs = _last_checkpoints(run_dir) if run_dir is not None else []
        hint = f" The newest last checkpoint of this run is {runs[-1]} (--ckpt_path last)." if runs else ""
        raise MissingFileError(f"--ckpt_path {ckpt_path}: no such file or folder (working directory {os.getcwd()})."
                               f"{hint} Fix: give an existing .ckpt file or checkpoint folder, or --ckpt_path last.")
    if subcommand == "fit":
        check_resume(ckpt_path, settings, resume_anyway)


def _check_checkpoint_dirs(callbacks: list[Any], ckpt_path: str | None) -> None:
    """A ``RunCheckpoint`` with its own ``dirpath`` that already holds files fails now, not after the models load
    (the same rule as ``RunCheckpoint.on_train_start``: resuming from inside the folder or ``overwrite`` is fine)."""
    for callback in callbacks:
        if not isinstance(callback, Namespace) or not str(callback.get("class_path")).endswith("RunCheckpoint"):
            continue
        init = callback.get("init_args") or Namespace()
        dirpath = init.get("dirpath")
        if not dirpath or init.get("overwrite") or not Path(dirpath).is_dir() or not any(Path(dirpath).iterdir()):
            continue
        resumed = ckpt_path == "last" or (ckpt_path and Path(ckpt_path).resolve().parent == Path(dirpath).resolve())
        if not resumed:
            shown = ", ".join(sorted(p.name for p in Path(dirpath).iterdir())[:3])
            raise OutputExistsError(
                f"checkpoint directory {dirpath} (RunCheckpoint dirpath) already holds files ({shown}) from another "
                "run; this run would overwrite them. Fix: resume that run with --ckpt_path last, choose another "
                "dirpath, or set RunCheckpoint overwrite: true to replace them."
            )


def composed_log_name(config: Namespace, argv: list[str]) -> None:
    """Give a composed config its own TensorBoard folder: the first config's logger name plus the file stem of every
    later ``--config`` that changes the method or the data (sets ``model.objective``, ``model.masker`` or ``data``),
    e.g. ``quickstart`` + ``configs/methods/confpo.yaml`` -> ``runs/quickstart-confpo``. A name set on the command
    line, or by that later file itself, is kept as it is."""
    import yaml

    logger = config.get("trainer", {}).get("logger")
    if not isinstance(logger, Namespace) or not isinstance(logger.get("init_args"), Namespace):
        return
    if any(a.startswith(("--trainer.logger.init_args.name", "--trainer.logger.name")) for a in argv):
        return
    stems = []
    for file in config_files(argv)[1:]:
        try:
            content = yaml.safe_load(_path(file).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        model, trainer = content.get("model") or {}, content.get("trainer") or {}
        names_itself = "name" in ((trainer.get("logger") or {}).get("init_args") or {}) if isinstance(
            trainer.get("logger"), dict) else False
        if names_itself:
            stems = []
        elif "data" in content or isinstance(model, dict) and ("objective" in model or "masker" in model):
            stems.append(Path(file).stem)
    name = logger.init_args.get("name")
    if stems and name:
        logger.init_args["name"] = "-".join([str(name), *stems])


def _last_checkpoints(run_dir: Path) -> list[str]:
    found = [p for p in run_dir.glob("*/checkpoints/last*.ckpt") if p.exists()]  # skips broken links
    return [str(p) for p in sorted(found, key=os.path.getmtime)]


def plain_own_warnings() -> None:
    """Print the warnings raised by this package as their message only: they name the file, row or option
    themselves, and the package's own source line (``.../data/splits.py:45:``) would only confuse."""
    previous = warnings.formatwarning
    if getattr(previous, "sparsepo", False):
        return
    package = str(Path(__file__).resolve().parent)

    def formatwarning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
        if str(filename).startswith(package):
            return f"{message}\n"
        return previous(message, category, filename, lineno, line)

    formatwarning.sparsepo = True  # type: ignore[attr-defined]
    warnings.formatwarning = formatwarning


class _DropAdvertisement(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_lightning() -> None:
    """Drop Lightning's "Tip: ... litlogger" advertisement (printed on every run)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropAdvertisement) for f in target.filters):
            target.addFilter(_DropAdvertisement())
