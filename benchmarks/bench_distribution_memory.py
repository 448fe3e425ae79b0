"""Extra memory of AlignDistil's full-vocabulary divergence against today's fused KL path (docs/full-distribution.md).

Same set-up as ``bench_memory.py``: one pair (2 rows of T tokens, prompt T/4), SmolLM2-135M's head shape
(V = 49152, d = 576), random hidden states and head weights (policy trainable, the others constant), each
measurement in a fresh subprocess, peak above the memory held before the call (CUDA ``max_memory_allocated``, CPU
``VmHWM`` after ``echo 5 > /proc/self/clear_refs``), forward + backward to the policy's hidden states and head.

- ``fused_kl`` (baseline): ``token_stats(implementation="fused")``, label log-probs of policy and reference and
  KL(π_ref‖π_θ) — what TDPO / SparsePO compute every step;
- ``aligndistil``: AlignDistil's step — label log-probs of both models (``token_stats``, no KL) and the divergence
  KL(π_θ‖π*) to the teacher built from the reference, a DPO and a reverse-DPO head
  (``distribution_stats`` with ``methods.aligndistil.TeacherDivergence``, fused, closed-form gradient).

Run: ``python benchmarks/bench_distribution_memory.py`` (``--lengths 512,1024,2048``, ``--repeats 3`` by default;
each cell is the largest peak of its repeats: CPU RSS peaks move by tens of MiB between runs). Target:
``aligndistil / fused_kl ≤ 1.5`` at T = 1024.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench_memory import HIDDEN, VOCAB  # benchmarks/ is on sys.path when a script here runs
from proc_status import measure_in_fresh_process, memory_parser, peak_since_start, start_peak

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fused_kl", "aligndistil")


def measure(method: str, length: int, chunk_size: int) -> dict:
    """Peak extra memory (MiB) of one forward + backward of the method's statistics, in this process."""
    import torch
    from torch import nn

    from sparsepo_lightning.distributions import distribution_stats
    from sparsepo_lightning.logprobs import token_stats
    from sparsepo_lightning.methods.aligndistil import TeacherDivergence

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=device).manual_seed(0)
    names = ("reference", "dpo", "reverse_dpo")
    hidden = torch.randn(2, length, HIDDEN, device=device, generator=g, requires_grad=True)
    head = nn.Linear(HIDDEN, VOCAB, bias=False).to(device)
    others = {}
    for name in names[: 1 if method == "fused_kl" else 3]:
        frozen_head = nn.Linear(HIDDEN, VOCAB, bias=False).to(device).requires_grad_(False)
        others[name] = (torch.randn(2, length, HIDDEN, device=device, generator=g), frozen_head)
    labels = torch.randint(0, VOCAB, (2, length - 1), device=device, generator=g)
    mask = torch.zeros(2, length - 1, dtype=torch.bool, device=device)
    mask[:, length // 4 - 1:] = True
    before = start_peak(device)
    ref_hidden, ref_head = others["reference"]
    stats = token_stats(hidden, labels, mask, head, ref_hidden, ref_head, with_kl=method == "fused_kl",
                        chunk_size=chunk_size, implementation="fused")
    loss = stats.policy_logps.sum() + stats.kl.sum()
    if method == "aligndistil":
        teacher = TeacherDivergence("dpo", "reverse_dpo", beta=0.1, adaptive=True, tv_scale=10.0, epsilon=1e-3,
                                    alpha=1.0)
        values = distribution_stats({"d": teacher}, hidden, labels, mask, head, others, chunk_size, "fused")
        loss = loss + values["d"].sum()
    loss.backward()
    peak = peak_since_start(device)
    return {"method": method, "length": length, "peak_extra_mib": (peak - before) / 2**20, "device": str(device)}


def main() -> None:
    parser = memory_parser(__doc__.split("\n\n")[0], "512,1024,2048",
                           ROOT / "benchmarks/results/distribution_memory.json")
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh processes per cell; the table shows the largest peak (CPU RSS peaks vary by run)")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.worker:
        print(json.dumps(measure(args.worker, lengths[0], args.chunk_size)))
        return
    rows = []
    for length in lengths:
        for method in METHODS:
            runs = [measure_in_fresh_process(__file__, method, length, args.chunk_size, ROOT)
                    for _ in range(args.repeats)]
            peaks = [r["peak_extra_mib"] for r in runs]
            rows.append({"method": method, "length": length, "device": runs[0].get("device"), "runs_mib": peaks,
                         "peak_extra_mib": None if None in peaks else max(peaks)})
    print(f"Peak extra memory (MiB), fwd+bwd, 1 pair, V={VOCAB}, d={HIDDEN}, chunk_size={args.chunk_size}, "
          f"device={rows[0].get('device')}")
    print("| T | fused KL (baseline) | AlignDistil | ratio |")
    print("|---|---|---|---|")
    for length in lengths:
        base, ours = (next(r["peak_extra_mib"] for r in rows if r["method"] == m and r["length"] == length)
                      for m in METHODS)
        ratio = ours / base if base and ours else float("nan")
        print(f"| {length} | {base or float('nan'):.0f} | {ours or float('nan'):.0f} | {ratio:.2f}× |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"vocab": VOCAB, "hidden": HIDDEN, "chunk_size": args.chunk_size, "results": rows},
                              indent=1) + "\n")


if __name__ == "__main__":
    main()
