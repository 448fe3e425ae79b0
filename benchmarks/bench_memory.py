"""Memory scaling of the token statistics alone: naive full logits vs checkpointed chunks vs the fused function.

For each T in 128…2048: one pair (2 rows of T tokens, prompt T/4), SmolLM2-135M's head shape (V = 49152,
d = 576), random hidden states and head weights (policy trainable, reference constant). One measurement =
label log-probs + full-vocabulary KL for policy and reference, then backward to the policy's hidden states and
head weight. Each measurement runs in a fresh subprocess; the peak is taken above the memory held before the
call (inputs, weights): CUDA ``max_memory_allocated``, CPU ``VmHWM`` after ``echo 5 > /proc/self/clear_refs``.

- ``naive``: ``log_softmax`` of the full ``(2, T-1, V)`` logits of both models (the released code's way);
- ``checkpoint``: ``token_stats(implementation="checkpoint")``, response tokens only, chunks under checkpoint;
- ``fused``: ``token_stats(implementation="fused")`` (:class:`~sparsepo_lightning.logprobs.FusedTokenStats`).

Run: ``python benchmarks/bench_memory.py`` (``--lengths 128,512`` for fewer points).
"""

from __future__ import annotations

import json
from pathlib import Path

from proc_status import (  # benchmarks/ is on sys.path when a script here runs
    measure_in_fresh_process,
    memory_parser,
    peak_since_start,
    start_peak,
)

ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN = 49152, 576
METHODS = ("naive", "checkpoint", "fused")


def _naive(hidden, weight, ref_hidden, ref_weight, labels, mask):
    import torch
    import torch.nn.functional as F

    policy_lp = F.log_softmax((hidden[:, :-1] @ weight.t()).float(), -1)  # (2, T-1, V)
    with torch.no_grad():
        ref_lp = F.log_softmax((ref_hidden[:, :-1] @ ref_weight.t()).float(), -1)
    label_lp = policy_lp.gather(-1, labels[..., None]).squeeze(-1) * mask
    kl = (ref_lp.exp() * (ref_lp - policy_lp)).sum(-1) * mask
    return label_lp, kl


def measure(method: str, length: int, chunk_size: int) -> dict:
    """Peak extra memory (MiB) of one forward + backward of the statistics, in this process."""
    import torch
    from torch import nn

    from sparsepo_lightning.logprobs import token_stats

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(2, length, HIDDEN, device=device, generator=g, requires_grad=True)
    ref_hidden = torch.randn(2, length, HIDDEN, device=device, generator=g)
    head, ref_head = nn.Linear(HIDDEN, VOCAB, bias=False).to(device), nn.Linear(HIDDEN, VOCAB, bias=False).to(device)
    ref_head.requires_grad_(False)
    labels = torch.randint(0, VOCAB, (2, length - 1), device=device, generator=g)
    mask = torch.zeros(2, length - 1, dtype=torch.bool, device=device)
    mask[:, length // 4 - 1:] = True  # prompt T/4 tokens, the rest is response
    before = start_peak(device)
    if method == "naive":
        label_lp, kl = _naive(hidden, head.weight, ref_hidden, ref_head.weight, labels, mask)
    else:
        stats = token_stats(hidden, labels, mask, head, ref_hidden, ref_head, chunk_size=chunk_size,
                            implementation=method)
        label_lp, kl = stats.policy_logps, stats.kl
    (label_lp.sum() + kl.sum()).backward()
    peak = peak_since_start(device)
    return {"method": method, "length": length, "peak_extra_mib": (peak - before) / 2**20, "device": str(device)}


def main() -> None:
    parser = memory_parser(__doc__.split("\n\n")[0], "128,256,512,1024,2048", ROOT / "benchmarks/results/memory.json")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.worker:
        print(json.dumps(measure(args.worker, lengths[0], args.chunk_size)))
        return
    results: dict[tuple[str, int], float | None] = {}
    for length in lengths:
        for method in METHODS:
            results[method, length] = measure_in_fresh_process(__file__, method, length, args.chunk_size,
                                                               ROOT)["peak_extra_mib"]
    print(f"Peak extra memory (MiB) of label log-probs + full-vocab KL, fwd+bwd, 1 pair, V={VOCAB}, d={HIDDEN}, "
          f"chunk_size={args.chunk_size}")
    print("| T | " + " | ".join(METHODS) + " | naive / fused |")
    print("|---" * (len(METHODS) + 2) + "|")
    for length in lengths:
        cells = [results[m, length] for m in METHODS]
        ratio = cells[0] / cells[-1] if cells[0] and cells[-1] else float("nan")
        print(f"| {length} | " + " | ".join("fail" if c is None else f"{c:.0f}" for c in cells) + f" | {ratio:.1f}× |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"method": m, "length": n, "peak_extra_mib": v} for (m, n), v in results.items()]
    out.write_text(json.dumps({"vocab": VOCAB, "hidden": HIDDEN, "chunk_size": args.chunk_size, "results": rows},
                              indent=1) + "\n")


if __name__ == "__main__":
    main()
