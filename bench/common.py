"""Shared pieces of the benchmark scripts: timing, the float32 matmul ceiling, the machine's description."""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def matmul_ceiling(n: int = 1024, repeats: int = 10) -> float:
    """Measured float32 FLOP/s of an n×n×n matmul: the roofline MFU is reported against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def timed(fn, warmup: int, repeats: int) -> float:
    """Seconds per call of ``fn``: the median over ``repeats`` timed calls, after ``warmup`` untimed ones (the
    median, because on a shared machine a few calls can be slowed by other work)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_gap(marks: list[float]) -> float:
    """The median time between consecutive marks (e.g. the ends of training steps)."""
    return statistics.median(b - a for a, b in zip(marks, marks[1:]))
