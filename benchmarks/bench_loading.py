"""CPU memory per rank while building and FSDP2-sharding policy + reference: ``from_pretrained`` vs ``meta_init``.

Two ranks (gloo, CPU) each build ``PreferenceModule(model=..., meta_init=...)`` and run its ``configure_model``
on a 2-way data-parallel mesh, as ``ModelParallelStrategy`` does: both models sharded per block, head and body.
Each rank reports the peak of its anonymous resident memory (``RssAnon``, sampled every millisecond: heap
allocations, not the memory-mapped checkpoint, which is shared page cache) above what it held before building,
the same after ``configure_model``, and the bytes of its own parameter shards. Both loading modes run in the
same invocation, each in fresh processes; the ratio is ``meta_init`` / ``from_pretrained``.

Run: ``python benchmarks/bench_loading.py`` (default model: SmolLM2-135M, ``--model`` for another; model dtypes
float32, the checkpoint's own, and bfloat16, a conversion; writes ``benchmarks/results/loading.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch.multiprocessing as mp
from proc_status import status_kib  # benchmarks/ is on sys.path when a script here runs

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


class _AnonPeak:
    """Peak anonymous resident memory (``RssAnon``: heap, not file pages), sampled every millisecond.

    ``VmHWM`` also counts the memory-mapped checkpoint file, which is page cache shared by all ranks (and
    reclaimable), so it would hide what each process really allocates."""

    def __init__(self) -> None:
        import threading

        self.peak = status_kib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, status_kib("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, status_kib("RssAnon"))


def _worker(rank: int, model: str, meta_init: bool, dtype: str, port: int, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from sparsepo_lightning.masks import LearnedMasker
    from sparsepo_lightning.module import PreferenceModule
    from sparsepo_lightning.objectives import SparsePO

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("data_parallel",))
    base = status_kib("RssAnon")
    sampler = _AnonPeak()
    module = PreferenceModule(model=model, objective=SparsePO(), masker=LearnedMasker(), meta_init=meta_init,
                              dtype=dtype)
    module._device_mesh = mesh
    module.configure_model()
    peak = sampler.stop()
    local = sum(p.to_local().numel() * p.element_size() for lm in (module.policy, module.reference)
                for p in lm.parameters())
    dist.barrier()
    results[(meta_init, rank)] = {"peak_mib": (peak - base) / 1024, "after_mib": (status_kib("RssAnon") - base) / 1024,
                                  "local_shards_mib": local / 2**20}
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="model dtypes to load in (SmolLM2's converted checkpoint is float32: bfloat16 converts)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "loading.json"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from sparsepo_lightning.model_sources import resolve_model_path

    model = resolve_model_path(args.model)  # convert an alias once, before the ranks start
    manager = mp.Manager()
    report = {"model": args.model, "world_size": WORLD, "runs": {}}
    for dtype in args.dtypes.split(","):
        results = manager.dict()
        for meta_init in (False, True):
            mp.spawn(_worker, args=(model, meta_init, dtype, _free_port(), results), nprocs=WORLD, join=True)
        rows = {("meta_init" if meta else "from_pretrained"): [dict(results[(meta, r)]) for r in range(WORLD)]
                for meta in (False, True)}
        ratios = [rows["meta_init"][r]["peak_mib"] / rows["from_pretrained"][r]["peak_mib"] for r in range(WORLD)]
        report["runs"][dtype] = {"rows": rows, "peak_ratio": ratios}
        print(f"\n{args.model}, model dtype {dtype}: 2 CPU ranks, FSDP2; anonymous memory (RssAnon) per rank above "
              "what it held before building")
        print(f"{'loading':<16}{'rank':>5}{'peak MiB':>11}{'after MiB':>11}{'own shards MiB':>16}")
        for name, ranks in rows.items():
            for rank, row in enumerate(ranks):
                print(f"{name:<16}{rank:>5}{row['peak_mib']:>11.0f}{row['after_mib']:>11.0f}"
                      f"{row['local_shards_mib']:>16.0f}")
        shown = ", ".join(f"rank {r}: {x:.2f}" for r, x in enumerate(ratios))
        print(f"peak ratio meta_init / from_pretrained: {shown}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
