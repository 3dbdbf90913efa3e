"""Memory probes and fresh-process runs shared by the benchmarks (``fci.py``, ``memory.py``).

Memory is measured as:

* CPU: resident set size from ``/proc/self/status``, the peak (VmHWM) being reset before each
  phase by writing 5 to ``/proc/self/clear_refs`` (Linux ≥ 4.0; tracemalloc does not see torch's
  allocations). Workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc serves every buffer
  above 64 KiB with mmap and unmaps it on free; without it, heap reuse and fragmentation made
  small figures wander between runs of the same input.
* CUDA: ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` with peak statistics reset.

Every measurement runs in a FRESH subprocess (``run_worker``), so no method or earlier length
leaves allocator state behind. A worker can be given an address-space cap (``RLIMIT_AS``): a
baseline that would need more memory than the machine has then fails with an allocation error,
which the worker reports, instead of the kernel's OOM killer taking the machine down.
"""

from __future__ import annotations

import gc
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
GIB = 1024 * MIB
CPU_NOTE = "RSS (VmRSS / VmHWM reset via clear_refs), fresh process per run, MALLOC_MMAP_THRESHOLD_=65536"
CUDA_NOTE = "torch.cuda.memory_allocated / max_memory_allocated, fresh process per run"
# torch's CPU allocator and Python say so when an allocation is refused (e.g. under RLIMIT_AS).
_OUT_OF_MEMORY = re.compile(r"can't allocate memory|not enough memory|MemoryError|out of memory", re.IGNORECASE)


def memory_note(device: str) -> str:
    return CPU_NOTE if device == "cpu" else CUDA_NOTE


def _proc_kib(path: str, field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path(path).read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{path} has no {field}")
    return int(match.group(1))


def available_bytes() -> int:
    """What the kernel says can still be allocated without swapping (MemAvailable)."""
    return _proc_kib("/proc/meminfo", "MemAvailable") * 1024


def current_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return _proc_kib("/proc/self/status", "VmRSS") * 1024


def reset_peak(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _proc_kib("/proc/self/status", "VmHWM") * 1024


def run_worker(script: Path, arguments: list[str], *, threads: int, memory_cap: int | None = None) -> dict[str, Any]:
    """Run ``script --worker ...`` in a fresh process; its last stdout line is its JSON result.

    With ``memory_cap`` (bytes of address space), a worker that runs out of memory returns
    ``{"out_of_memory": True, "memory_cap_bytes": ..., "error": ...}`` instead of its result.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "MALLOC_MMAP_THRESHOLD_": "65536"}

    def limit() -> None:
        if memory_cap is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_cap, memory_cap))

    done = subprocess.run([sys.executable, str(script), *arguments], capture_output=True, text=True, env=env,
                          check=False, preexec_fn=limit)
    if done.returncode != 0:
        tail = done.stderr[-4000:]
        if memory_cap is not None and _OUT_OF_MEMORY.search(tail):
            return {"out_of_memory": True, "memory_cap_bytes": memory_cap, "error": tail.strip().splitlines()[-1]}
        raise RuntimeError(f"{script.name} {' '.join(arguments)} failed:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])
