"""Benchmark results as JSON in ``benchmarks/results/``, with what is needed to reproduce them."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Device, library versions, commit and date of this run."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=RESULTS_DIR.parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU: {_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return {
        "device": device, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "python": platform.python_version(), "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_results(name: str, payload: dict) -> Path:
    """Write ``payload`` plus :func:`environment` to ``benchmarks/results/<name>.json``; returns the path."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    return path
