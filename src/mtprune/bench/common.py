"""What every suite records: the machine, the threads, the date, and where results go."""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

import torch


def machine() -> dict:
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def results_dir(suite: str, out: str | Path | None) -> Path:
    path = Path(out) if out else Path("benchmarks") / "results" / suite
    path.mkdir(parents=True, exist_ok=True)
    return path
