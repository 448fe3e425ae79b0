"""Command line: ``sparsepo fit|validate|test --config configs/<task>/<variant>.yaml`` (LightningCLI).

Examples::

    sparsepo fit --config configs/quickstart.yaml
    sparsepo fit --config configs/quickstart.yaml --model.objective.beta 0.5 --trainer.max_steps 20
    sparsepo fit --config configs/quickstart.yaml --print_config      # the full resolved configuration
    sparsepo evaluate --help                                          # evaluation commands (argparse)
    sparsepo export runs/quickstart/version_0/checkpoints/last.ckpt exported/quickstart   # HF checkpoint + masks

The model name is given once (``model.model``) and linked to the data module's tokenizer (or
``model.tokenizer_name`` when the checkpoint ships none, e.g. ``gpt2-large`` for the IMDB GPT-2 SFT model). The
``data`` section names its DataModule by ``class_path`` (``PreferenceDataModule`` for plain pair files, or a task
loader such as ``sparsepo_lightning.data.hh.HHDataModule``). TensorBoard is the
default logger (``runs/<name>/version_N``); each run gets a new version directory, nothing is overwritten.
"""

from __future__ import annotations

import sys
import warnings

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from sparsepo_lightning.data import PreferenceDataModule
from sparsepo_lightning.module import PreferenceModule

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


class SparsePOCLI(LightningCLI):
    """LightningCLI with the values shared by model and data linked once."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
        sources = ("model.model", "model.tokenizer_name")
        parser.link_arguments(sources, "data.init_args.tokenizer", compute_fn=_tokenizer_name)
        parser.set_defaults({"trainer.callbacks": CALLBACK_DEFAULTS})

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


def _tokenizer_name(model: str, tokenizer: str | None) -> str:
    """The data module's tokenizer: ``model.tokenizer_name`` when set (e.g. ``gpt2-large``), else the model name."""
    return tokenizer or model


def run(args: list[str] | None = None) -> SparsePOCLI:
    """Parse ``args`` (default: the command line), run the subcommand, and return the CLI object."""
    # The frozen reference is in eval mode on purpose; Lightning's generic warning about it is noise here.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    return SparsePOCLI(
        PreferenceModule,
        PreferenceDataModule,
        subclass_mode_data=True,  # task loaders (HHDataModule, ...) are chosen by class_path
        seed_everything_default=42,
        trainer_defaults=TRAINER_DEFAULTS,
        args=args,
    )


def main() -> None:
    """Entry point of the ``sparsepo`` console script (returns nothing, so the exit status is 0 on success).

    ``sparsepo evaluate <command> ...`` and ``sparsepo export ...`` are dispatched to
    :mod:`sparsepo_lightning.evaluate` and :mod:`sparsepo_lightning.export` before LightningCLI.
    """
    if sys.argv[1:2] == ["evaluate"]:
        from sparsepo_lightning.evaluate import main as evaluate_main

        evaluate_main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["export"]:
        from sparsepo_lightning.export import main as export_main

        export_main(sys.argv[2:])
        return
    run()


if __name__ == "__main__":
    main()
