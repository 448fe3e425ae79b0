"""Command line: ``sparsepo fit|validate|test --config configs/<task>/<variant>.yaml`` (LightningCLI), plus
``sparsepo evaluate`` and ``sparsepo export``.

Examples::

    sparsepo fit --config configs/quickstart.yaml
    sparsepo fit --config configs/quickstart.yaml --model.objective.beta 0.5 --trainer.max_steps 20
    sparsepo fit --config configs/quickstart.yaml --print_config      # the full resolved configuration
    sparsepo evaluate --help                                          # evaluation commands (argparse)
    sparsepo export runs/quickstart/version_0/checkpoints/last.ckpt exported/quickstart   # HF checkpoint + masks

The model name is given once (``model.model``) and linked to the data module's tokenizer (or
``model.tokenizer_name`` when the checkpoint ships none, e.g. ``gpt2-large`` for the IMDB GPT-2 SFT model). The
``data`` section names its DataModule by ``class_path`` (``PreferenceDataModule`` for plain pair files, or a task
loader such as ``sparsepo_lightning.tasks.hh.HHDataModule``). TensorBoard is the
default logger (``runs/<name>/version_N``); each run gets a new version directory, nothing is overwritten.

User errors (configuration, options, data, checkpoints, paths: :mod:`sparsepo_lightning.errors`, parse errors, a
plug-in's own argument check, a ``class_path`` that does not import) print one message with the place and the fix
and exit with status 2, without a traceback; ``--debug`` (anywhere on the command line) or ``SPARSEPO_DEBUG=1``
shows it. SIGINT, SIGTERM and SIGUSR1 end training after the current optimizer step with a checkpoint and the run
summary, exit status 128 + signal (130, 143, 138; :mod:`sparsepo_lightning.interrupt`). ``--ckpt_path last`` resumes
the newest checkpoint of the same run identity (:mod:`sparsepo_lightning.run_identity`). Everything that needs no
model is checked before the models load: the data files (exist, at least one valid pair), ``--ckpt_path`` and the
log folder. The exact per-optimizer-step statistics, mask histograms and learning rates are logged by default
(``--exact_statistics``, :mod:`sparsepo_lightning.callbacks.statistics`), with TensorBoard's custom-scalars layout
(:mod:`sparsepo_lightning.dashboard`).
"""

from __future__ import annotations

import contextvars
import os
import sys
import warnings
from typing import Any

from jsonargparse import ActionYesNo, ArgumentParser
from lightning.pytorch import Callback, LightningDataModule
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import LightningCLI, _InstantiatorFn
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from sparsepo_lightning import cli_support, data_inputs, dispatch
from sparsepo_lightning.callbacks.statistics import MaskStatistics, RewardStatistics
from sparsepo_lightning.commands import DESCRIPTION, OTHER_COMMANDS, SUBCOMMAND_HELP, listed_help
from sparsepo_lightning.dashboard import DashboardLayout, without_internal_hparams
from sparsepo_lightning.data import PreferenceDataModule
from sparsepo_lightning.interrupt import GracefulStop, exit_status
from sparsepo_lightning.module import PreferenceModule
from sparsepo_lightning.progress import PlainProgress, StepProgressBar
from sparsepo_lightning.run_identity import RunIdentity, identity_settings
from sparsepo_lightning.tasks import (  # the task loaders are imported so that `fit --help` lists them
    code,  # noqa: F401
    hh,  # noqa: F401
    imdb,  # noqa: F401
    tldr,  # noqa: F401
)

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "sparsepo"},
    },
    # Crash safety (sparsepo_lightning/checkpointing.py): atomic checkpoint writes and weights_only loads. With
    # CALLBACK_DEFAULTS: a last.ckpt every 200 optimizer steps (mid-epoch) and at each epoch end, and
    # `--ckpt_path last` resumes from the newest run version.
    "plugins": {"class_path": "sparsepo_lightning.checkpointing.AtomicCheckpointIO"},
}

CALLBACK_DEFAULTS = [
    {
        "class_path": "sparsepo_lightning.checkpointing.RunCheckpoint",
        "init_args": {"save_last": "link", "every_n_train_steps": 200},  # last.ckpt = a link, not a 2nd copy
    },
]
"""Default ``trainer.callbacks`` (a parser default, so a config's own list replaces it, unlike LightningCLI's
persistent ``trainer_defaults`` callbacks which could not be configured)."""


CKPT_PATH_HELP = (
    "Checkpoint to resume (fit) or to evaluate (validate, test): a .ckpt file or a sharded checkpoint folder, or "
    "'last': the newest runs/<name>/version_*/checkpoints/last*.ckpt written by this same run identity (the "
    "resolved config minus step limits, paths, devices and logging; the choice and the checkpoints skipped are "
    "printed). fit refuses a checkpoint of another run identity, naming what differs, unless --resume_anyway."
)


class SparsePOCLI(LightningCLI):
    """LightningCLI with the values shared by model and data linked once, ``fit``/``validate``/``test`` only,
    clear parse errors and the checks that need no model run before the models load."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in SUBCOMMAND_HELP}

    def _add_subcommands(self, parser, **kwargs: Any) -> None:  # noqa: ANN001
        for name, help_line in SUBCOMMAND_HELP.items():  # the one-line help shown by `sparsepo --help`
            kwargs.setdefault(name, {}).setdefault("description", help_line)
        super()._add_subcommands(parser, **kwargs)
        for choice in parser._subcommands_action._choices_actions:
            choice.help = SUBCOMMAND_HELP.get(choice.dest, choice.help)
        for name in SUBCOMMAND_HELP:  # --ckpt_path as this tool resolves it, not Lightning's description
            for action in parser._subcommands_action._name_parser_map[name]._actions:
                if action.dest == "ckpt_path":
                    action.help = CKPT_PATH_HELP
        for name, help_line in OTHER_COMMANDS.items():  # listed only: dispatch.main runs them, not LightningCLI
            listed = ArgumentParser(prog=f"sparsepo {name}", description=help_line)
            parser._subcommands_action.add_subcommand(name, listed, help=listed_help(name))

    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001
        cli_support.ARGV[:] = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        cli_support.START_DIR[:] = [os.getcwd()]
        if not isinstance(args, dict):  # a changed data.class_path does not inherit the earlier data inputs
            extra, notes = data_inputs.settle(cli_support.ARGV, os.getcwd())
            for note in notes:
                rank_zero_info(note)
            if extra and args is None:  # LightningCLI warns when given both sys.argv and args
                sys.argv[1:] = [*cli_support.ARGV, *extra]
            elif extra:
                args = [*cli_support.ARGV, *extra]
        super().parse_arguments(parser, args)
        if self.config.get("subcommand"):
            cli_support.composed_log_name(self.config[self.config.subcommand], cli_support.ARGV)

    def _parse_ckpt_path(self) -> None:
        """``fit`` keeps the configuration it is given: Lightning would replace the model's settings by those saved in
        ``--ckpt_path`` (silently dropping ``--model.*`` options); a checkpoint of another run identity is an error
        instead (:func:`~sparsepo_lightning.run_identity.check_resume`)."""
        if self.config.get("subcommand") != "fit":
            super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
        sources = ("model.model", "model.tokenizer_name")
        parser.link_arguments(sources, "data.init_args.tokenizer", compute_fn=_tokenizer_name)
        parser.set_defaults({"trainer.callbacks": CALLBACK_DEFAULTS})
        parser.add_argument("--exact_statistics", type=bool, default=True,
                            help="Log the exact statistics of every optimizer step and validation run (train_step/*, "
                                 "val_epoch/*: masks, rewards, KL over all micro-batches and GPUs), mask histograms "
                                 "every 50 steps and the learning rates, unless trainer.callbacks configures its own "
                                 "MaskStatistics / RewardStatistics / LearningRateMonitor. The per-batch values then "
                                 "stay out of the loggers (one series per quantity).")
        parser.add_argument("--resume_anyway", action=ActionYesNo, default=False,
                            help="Resume --ckpt_path although it was written by another run identity (a different "
                                 "model, objective, masker, data or optimisation setting); without it that is an error "
                                 "naming what differs.")

    def before_instantiate_classes(self) -> None:
        """Checks before any model loads. The data module (a subclass-mode argument) is instantiated before the
        model group, so its files are checked there, through an instantiator wrapping Lightning's own."""
        if self.subcommand is None:
            return
        cli_support.check_before_loading(self.config[self.subcommand], self.subcommand)
        self._identity = identity_settings(self.config[self.subcommand])
        lightning_instantiator = _InstantiatorFn(cli=self, key="data")
        subcommand = self.subcommand

        def instantiate_and_check(class_type: type, *args: Any, applied_instantiation_links: dict,
                                  **kwargs: Any) -> LightningDataModule:  # fmt: skip
            datamodule = lightning_instantiator(class_type, *args,
                                                applied_instantiation_links=applied_instantiation_links, **kwargs)
            if isinstance(datamodule, PreferenceDataModule):
                datamodule.check_sources(subcommand)
            return datamodule

        self.parser.add_instantiator(instantiate_and_check, LightningDataModule, subclasses=True, prepend=True)

    def instantiate_trainer(self, **kwargs: Any):  # noqa: ANN201
        """Lightning's trainer, with :class:`StepProgressBar` as the progress bar on a terminal and
        :class:`~sparsepo_lightning.progress.PlainProgress` (a plain line every few steps) otherwise, unless the config
        has one or turns it off."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = list(kwargs.pop("callbacks", None) or config.get("callbacks") or [])
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            callbacks.append(StepProgressBar() if sys.stdout.isatty() else PlainProgress())
        if getattr(self, "_identity", None) is not None:
            callbacks.append(RunIdentity(self._identity))
        if self._get(self.config, "exact_statistics", default=True):
            callbacks += missing_statistics(callbacks, with_logger=config.get("logger") not in (False, None))
        callbacks += [GracefulStop(), DashboardLayout()]
        trainer = super().instantiate_trainer(callbacks=callbacks, **kwargs)
        placeholder = cli_support.mentions("default_hp_metric", cli_support.ARGV)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                if not placeholder:  # no `hp_metric -1` placeholder tag unless asked for
                    logger._default_hp_metric = False
                without_internal_hparams(logger)
        return trainer

    def after_fit(self) -> None:
        trainer = self.trainer
        lines = []
        if trainer.logger is not None and trainer.logger.log_dir:
            lines.append(f"logs:        {trainer.logger.log_dir}")
            lines.append(f"view them:   tensorboard --logdir {trainer.logger.save_dir}")
        callback = trainer.checkpoint_callback
        checkpoint = callback and (callback.best_model_path or callback.last_model_path)
        if checkpoint:
            lines.append(f"checkpoint:  {checkpoint}")
        if lines:
            rank_zero_info("Training finished.\n  " + "\n  ".join(lines))
        status = exit_status(trainer)
        if status is not None:
            sys.exit(status)


def missing_statistics(callbacks: list[Callback], with_logger: bool) -> list[Callback]:
    """The default statistics callbacks that ``callbacks`` lacks: ``MaskStatistics`` (histograms every 50 optimizer
    steps), ``RewardStatistics`` and, when the run has a logger, a step-wise ``LearningRateMonitor``."""
    defaults = [MaskStatistics(histogram_every_n_steps=50), RewardStatistics()]
    if with_logger:
        defaults.append(LearningRateMonitor(logging_interval="step"))
    return [d for d in defaults if not any(isinstance(c, type(d)) for c in callbacks)]


def _tokenizer_name(model: str, tokenizer: str | None) -> str:
    """The data module's tokenizer: ``model.tokenizer_name`` when set (e.g. ``gpt2-large``), else the model name."""
    return tokenizer or model


def run(args: list[str] | None = None) -> SparsePOCLI:
    """Parse ``args`` (default: the command line), run the subcommand, and return the CLI object."""
    # The frozen reference is in eval mode on purpose; Lightning's generic warning about it is noise here.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # Our data module resumes mid-epoch exactly (its state_dict); RunCheckpoint says what resumes instead.
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    # A first run bounded by --trainer.max_time has a Timer callback; its resume need not be (limits may change).
    warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`.* callbacks: \['Timer'\]\.")
    cli_support.quiet_lightning()
    cli_support.plain_own_warnings()
    # In a copy of the current context: jsonargparse sets a context variable to its parser and never resets it, and
    # the parser's instantiators reach this CLI, so the trainer and the models would outlive the run in the process.
    return contextvars.copy_context().run(
        SparsePOCLI,
        PreferenceModule,
        PreferenceDataModule,
        subclass_mode_data=True,  # task loaders (HHDataModule, ...) are chosen by class_path
        seed_everything_default=42,
        trainer_defaults=TRAINER_DEFAULTS,
        parser_kwargs={"prog": "sparsepo", "description": DESCRIPTION},
        parser_class=cli_support.SparsePOArgumentParser,
        auto_configure_optimizers=False,  # one place for the optimizer: model.optimizer (keeps groups + schedule)
        args=args,
    )


def main() -> None:
    """Entry point of ``python -m sparsepo_lightning.cli`` (returns nothing, so the exit status is 0 on success).

    :func:`sparsepo_lightning.dispatch.main` with :func:`run`: ``sparsepo evaluate <command> ...``, ``sparsepo export
    ...`` and ``sparsepo study ...`` go to their own parsers, everything else to LightningCLI; a
    :class:`~sparsepo_lightning.errors.UserError` is printed as one message (exit status 2) unless ``--debug`` is on
    the command line or ``SPARSEPO_DEBUG`` is set (then: the traceback).
    """
    dispatch.main(run)


if __name__ == "__main__":
    main()
