"""Two-process CPU (gloo) FSDP run for ``tests/test_export.py``: Lightning re-launches this file per rank.

Usage: ``python tests/export_run.py OUT_DIR MODEL_DIR PAIRS_FILE [fsdp2|fsdp1]``. Two AdamW steps with learned
masks under ``ModelParallelStrategy`` (FSDP2) or ``FSDPStrategy`` (FSDP1 on CPU, sharded state dict), then
``OUT_DIR/sharded`` (a distributed checkpoint: one shard per rank + ``meta.pt``) and, from rank 0,
``OUT_DIR/full.pt``: the full (gathered) policy and mask weights at that same point.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.distributed_run import make_data, make_module, make_trainer, snapshot


def main(out_dir: str, model_dir: str, pairs: str, strategy: str = "fsdp2") -> None:
    out = Path(out_dir)
    module = make_module(model_dir, optimizer=torch.optim.AdamW, lr=1e-2)
    trainer = make_trainer(strategy, 2, out / "root", max_steps=2, callbacks=[])
    trainer.fit(module, datamodule=make_data(model_dir, pairs, batch_size=2))
    trainer.save_checkpoint(out / "sharded")
    full = snapshot(module)  # collective: all ranks
    full = {"policy": full["policy"], "masker": full["masker"]}
    if trainer.global_rank == 0:
        torch.save({**full, "global_step": trainer.global_step}, out / "full.pt")


if __name__ == "__main__":
    main(*sys.argv[1:5])
