"""TensorBoard's dashboard of a run: a custom-scalars layout and hyper-parameters without the CLI's internals.

:class:`DashboardLayout` writes, at the start of each run, a layout for TensorBoard's *Custom Scalars* tab that
puts mask sparsity beside margins, accuracy and KL. Each chart is a regular expression over the tags of all four
series of a quantity: the module's per-batch ``train/*`` and ``val/*`` (:mod:`sparsepo_lightning.metrics`) and the
exact ``train_step/*`` and ``val_epoch/*`` of the statistics callbacks (:mod:`sparsepo_lightning.callbacks.
statistics`), chosen and rejected responses on one chart (desirable and undesirable examples for BCO). A chart
shows the series that exist; the others stay empty.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

_STAGES = "(train|train_step|val|val_epoch)/"
_SIDES = "(chosen|rejected|desirable|undesirable)"


def _chart(name: str) -> list[Any]:
    return ["Multiline", [f"^{_STAGES}{name}$"]]


LAYOUT: dict[str, dict[str, list[Any]]] = {
    "sparsepo: masks": {
        "reward-mask zeros (% of response tokens)": _chart(f"masks/sparsity_reward_{_SIDES}"),
        "KL-mask zeros (% of response tokens)": _chart(f"masks/sparsity_kl_{_SIDES}"),
        "mean mask value": _chart("masks/mean_(reward|kl)"),
        "dead mask units (fraction)": _chart("masks/dead_units_(reward|kl)"),
    },
    "sparsepo: rewards": {
        "margin": _chart("rewards/margin"),
        "accuracy": _chart("rewards/accuracy"),
        "rewards": _chart(f"rewards/{_SIDES}"),
        "loss": _chart("loss"),
    },
    "sparsepo: KL": {
        "sequence KL": _chart(f"kl/seq_{_SIDES}"),
        "per-token KL": _chart(f"kl/token_{_SIDES}"),
        "masked KL (K_w, K_l)": _chart(f"kl/masked_{_SIDES}"),
    },
}
"""Category -> chart title -> ``["Multiline", [tag regex]]``: TensorBoard's custom-scalars layout."""


class DashboardLayout(Callback):
    """Write :data:`LAYOUT` to every TensorBoard logger of the run, once, at the start of the run (rank zero)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(LAYOUT)


def without_internal_hparams(logger: TensorBoardLogger) -> None:
    """Make ``logger`` leave LightningCLI's ``_instantiator`` (how a checkpoint is rebuilt, kept in checkpoints) out
    of the hyper-parameters it logs."""
    log_hyperparams: Callable[..., None] = logger.log_hyperparams

    def log(params: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(params, Mapping):
            params = {key: value for key, value in params.items() if key != "_instantiator"}
        log_hyperparams(params, *args, **kwargs)

    logger.log_hyperparams = log  # type: ignore[method-assign]
