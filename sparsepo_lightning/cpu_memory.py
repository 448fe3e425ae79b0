"""Keep freed CPU memory in the process: a training step on a CPU stops paying the kernel to zero its temporaries.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and gives it
back to the system when it is freed; free memory at the top of the heap is also given back (``M_TRIM_THRESHOLD``).
A training step allocates and frees the same large tensors every step (activations, logits chunks, gradients), so
on a CPU each of them is faulted in again, page by page, and zeroed by the kernel at every step
(``benchmarks/bench_dpo.py`` reports this kernel time as ``sys_s`` with the page faults per step;
``benchmarks/bench_cpu_memory.py`` measures what keeping the memory saves). The GPU has no such cost: PyTorch's
CUDA allocator caches what it frees.

:func:`keep_freed_memory` does on the CPU what the CUDA caching allocator does: it tells glibc (``mallopt``) to serve
large blocks from the heap (``M_MMAP_MAX = 0``) and never to give the heap's free top back (``M_TRIM_THRESHOLD = -1``,
which disables trimming; the largest positive threshold, 2 GiB, still let a step that freed more give it back), so a
freed block is reused by the next step's allocation of that size. This is the effect PyTorch's
CPU performance guide gets from preloading jemalloc or TCMalloc, without a preload or a new dependency. Results are
the same to the bit (where memory comes from changes no arithmetic); the resident memory stays at its high-water
mark instead of falling back between steps, as on a GPU.

``sparsepo`` calls it at start (every command, every rank). ``SPARSEPO_CPU_MEMORY=system`` keeps glibc's defaults
(e.g. to share a machine's memory with other jobs between steps). Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

from sparsepo_lightning.errors import ConfigError

ENV = "SPARSEPO_CPU_MEMORY"
"""``keep`` (the default) or ``system`` (glibc's own settings)."""
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h
NO_TRIM = -1
"""``mallopt(M_TRIM_THRESHOLD, -1)``: never trim (glibc's documented value; the threshold is unsigned inside)."""


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring); True where it now does.

    Returns False, changing nothing, when ``SPARSEPO_CPU_MEMORY=system``, off Linux, or where the C library has no
    ``mallopt`` (not glibc). Raises ConfigError for any other value of ``SPARSEPO_CPU_MEMORY``.
    """
    choice = os.environ.get(ENV, "keep").strip().lower() or "keep"
    if choice not in ("keep", "system"):
        raise ConfigError(f"{ENV}={os.environ[ENV]!r}: use 'keep' (reuse freed memory, the default) or 'system' "
                         "(glibc's defaults).")
    if choice == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library symbols here, or not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NO_TRIM))
