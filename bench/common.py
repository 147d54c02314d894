"""Shared helpers of the benchmarks: side-by-side timing, tables, the machine they ran on.

Every benchmark times its variants interleaved (A, B, A, B, ...) in one process, so slow drift of a
noisy machine hits all of them alike, and reports medians and ratios of medians.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent  # the checkout (make installs it: vggattn imports from anywhere)


def article_reference():
    """The article's code, re-typed for the tests (tests/article_reference.py), loaded from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("article_reference", ROOT / "tests" / "article_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine() -> str:
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}{gpu}")


def interleaved(variants: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each callable `warmup` times, then `repeats` rounds of all of them in turn (order rotated
    each round); return {name: [seconds per call]}."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn, runs: int) -> float:
    """The median wall time of `runs` calls of fn (seconds)."""
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def table(header: list[str], rows: list[list]) -> str:
    """A GitHub-markdown table (what bench/README.md records)."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, header: list[str], rows: list[list], notes: list[str] = ()) -> None:
    print(f"\n### {title}\n\n{machine()}\n")
    print(table(header, rows))
    for n in notes:
        print(f"\n{n}")
