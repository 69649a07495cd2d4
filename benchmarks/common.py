"""What the benchmark scripts share: waiting for the GPU before reading a clock, reading the process's memory, and
running one case in a child process (so that each case's peak memory is its own) that prints its result as one
JSON line.

The peak is the kernel's VmHWM of this process's address space, which starts afresh at `exec`: `getrusage`'s
ru_maxrss does not (a child keeps the RSS its parent had when it forked, so a child of a large process would report
the parent's size as its own peak)."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def sync(device) -> None:
    """Wait for queued CUDA work, so that wall-clock times cover it (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def current_rss() -> int:
    """Resident bytes of this process now."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) so the peak is that of what follows (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident bytes of this process since it started (or since `reset_peak_rss`)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: KiB on most systems


def peak_rss_gib() -> float:
    return peak_rss() / 2**30


def run_case_in_child(module: str, spec: dict, timeout: int) -> dict:
    """`python -m <module> --child <spec as JSON>` -> the last JSON line it prints, or the spec with an `error`
    (timed out, out of memory, or the last line of its stderr) when it prints none."""
    command = [sys.executable, "-m", module, "--child", json.dumps(spec)]
    try:
        done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "case": spec["name"], "error": f"timed out after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        reason = "out of memory" if "MemoryError" in done.stderr or "alloc" in tail or done.returncode == -9 else tail
        return {**spec, "case": spec["name"], "error": f"exit {done.returncode}: {reason}"[:160]}
    return json.loads(lines[-1])
