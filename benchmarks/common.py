"""What the benchmark scripts share: waiting for the GPU before reading a clock, and running one case in a child
process (so that each case's peak memory is its own) that prints its result as one JSON line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def sync(device) -> None:
    """Wait for queued CUDA work, so that wall-clock times cover it (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


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
