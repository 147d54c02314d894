"""How long a command takes before it does anything: `import torch`, `import vggattn`, every console script's
--help and `python -m vggattn.explain --help`, in fresh processes; this checkout beside an older revision (a git
worktree of it, on PYTHONPATH), interleaved run by run.

    python bench/start_time.py --before 75caea1 --runs 5
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["app", "explain", "study", "train", "evaluate", "plots"]
OLD_MAIN = {"app": "vggattn.launcher", "explain": "vggattn.explain", "study": "vggattn.study",
            "train": "vggattn.training.train", "evaluate": "vggattn.training.evaluate", "plots": "vggattn.training.plots"}


def cases(new: bool) -> dict[str, list[str]]:
    """What a person types, as the command line each checkout runs it with (the console scripts' own code)."""
    out = {"import torch": ["-c", "import torch"], "import vggattn": ["-c", "import vggattn"],
           "from vggattn import analyze, capture": ["-c", "from vggattn import analyze, capture"]}
    for c in COMMANDS:
        call = f"from vggattn.launcher import {c} as m" if new else f"from {OLD_MAIN[c]} import main as m"
        out[f"vggattn-{c} --help"] = ["-c", f"{call}\nm(['--help'])"]
    out["python -m vggattn.explain --help"] = ["-m", "vggattn.explain", "--help"]
    return out


def timed(args: list[str], path: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(path), "GRADIO_ANALYTICS_ENABLED": "False"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, cwd=path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the git revision to compare with")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.before], check=True,
                       capture_output=True)
        try:
            sides = {"before": (old, cases(False)), "after": (ROOT, cases(True))}
            times = {(side, name): [] for side, (_, c) in sides.items() for name in c}
            for _ in range(args.runs):
                for name in cases(True):
                    for side, (path, c) in sides.items():
                        if name.startswith("import torch") and side == "before":
                            continue
                        times[side, name].append(timed(c[name], path))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=True)
    print(f"{args.runs} runs each, interleaved; median (min-max) seconds of a fresh process\n")
    print(f"| command | before (`{args.before}`) | after | after / before |\n|---|---|---|---|")
    for name in cases(True):
        b, a = times["before", name], times["after", name]
        fmt = lambda t: f"{statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f})" if t else "-"  # noqa: E731
        ratio = f"{statistics.median(a) / statistics.median(b):.2f}x" if b else "-"
        print(f"| `{name}` | {fmt(b)} | {fmt(a)} | {ratio} |")


if __name__ == "__main__":
    main()
