"""The A/B table of the model card from the runs' logs: val top-1 per arm (mean +- std over seeds)
and the paired differences between arms (same seed) with a 95% t interval.

    python scripts/ab_table.py checkpoints/logs/ab
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t(0.975, df)


def final_top1(folder: Path) -> dict[str, dict[int, float]]:
    """{arm: {seed: val top-1 of the last epoch}} from ab-<arm>-seed<k>.jsonl files."""
    out: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("ab-*-seed*.jsonl")):
        arm, seed = path.stem[3:].rsplit("-seed", 1)
        last = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][-1]
        out.setdefault(arm, {})[int(seed)] = last["val_top1"]
    return out


def interval(diffs: list[float]) -> tuple[float, float, float]:
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    half = T975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="folder of ab-<arm>-seed<k>.jsonl logs")
    args = p.parse_args(argv)
    acc = final_top1(args.folder)
    print("| arm | seeds | val top-1 per seed | mean ± std |\n| --- | --- | --- | --- |")
    for arm, by_seed in acc.items():
        v = [by_seed[s] for s in sorted(by_seed)]
        print(f"| {arm} | {len(v)} | {', '.join(f'{100 * x:.2f}' for x in v)} | "
              f"{100 * statistics.mean(v):.2f} ± {100 * statistics.stdev(v) if len(v) > 1 else 0:.2f} |")
    print("\n| difference (same seed) | per seed (points) | mean | 95% t interval |\n| --- | --- | --- | --- |")
    for a, b in (("attention", "none"), ("attention", "global"), ("global", "none")):
        if a in acc and b in acc:
            seeds = sorted(set(acc[a]) & set(acc[b]))
            d = [acc[a][s] - acc[b][s] for s in seeds]
            mean, lo, hi = interval(d)
            print(f"| {a} − {b} | {', '.join(f'{100 * x:+.2f}' for x in d)} | {100 * mean:+.2f} | "
                  f"[{100 * lo:+.2f}, {100 * hi:+.2f}] |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
