"""One line naming the machine and the date of a benchmark run, for its results file.

    >>> machine_line()   # doctest: +SKIP
    'machine: Intel(R) Xeon(R) Processor, 2 CPU cores, torch 2.13.0+cpu; date: 2026-11-26 (UTC)'
"""
import datetime
import os
import platform


def machine_line(device: str = "cpu") -> str:
    import torch

    parts = [_cpu_name(), f"{os.cpu_count()} CPU cores"]
    if device == "cuda" and torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name()}")
    parts.append(f"torch {torch.__version__}")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return f"machine: {', '.join(parts)}; date: {date} (UTC)"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
