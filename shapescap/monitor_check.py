"""Does the run monitor see what the truth shows? On ShapesCap a duplicated object is known exactly.

For each training run (logged at every step): the monitor's `health/repeated` from `metrics.jsonl`, and the
symbolic duplicate-object rate (`shapescap.metrics`) of the same step's sampled captions, read back from TRL's
completions log (`completions/completions_<step>.parquet`). Prints, per run, the Pearson correlation of the
two over steps, raw and as moving means over `--window` steps, and their first and last windows.

    python -m shapescap.monitor_check RUN [RUN ...] [--window 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rewards.common import completion_text
from shapescap.metrics import parse_caption


def duplicate_rate(captions: list[str]) -> float:
    """Share of captions that name one (colour, shape) object twice, as `shapes/duplicate_object` counts it."""
    objects = [parse_caption(c).objects for c in captions]
    return sum(len(o) > len(set(o)) for o in objects) / len(objects) if objects else 0.0


def run_series(run: Path) -> tuple[list[float], list[float]]:
    """(monitor's repeated rate, symbolic duplicate rate) per step that has both."""
    import pandas as pd

    monitor = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "health/repeated" in row:
            monitor[row["step"]] = row["health/repeated"]
    repeated, duplicates = [], []
    for step, value in sorted(monitor.items()):
        log = run / "completions" / f"completions_{step:05d}.parquet"
        if not log.is_file():
            continue
        captions = [completion_text(list(c)) or "" for c in pd.read_parquet(log)["completion"]]  # arrays of turns
        repeated.append(value)
        duplicates.append(duplicate_rate(captions))
    return repeated, duplicates


def moving_mean(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[i : i + window]) for i in range(len(values) - window + 1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shapescap.monitor_check", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--window", type=int, default=10)
    args = parser.parse_args(argv)
    print(
        "| run | steps | r (per step) | r (moving mean) | repeated, first → last window | duplicates, first → last window |"
    )
    print("|---|---:|---:|---:|---|---|")
    for run in args.runs:
        repeated, duplicates = run_series(run)
        if len(repeated) < args.window + 2:
            print(f"| {run} | {len(repeated)} | too few logged steps with completions | | | |")
            continue
        smooth_r, smooth_d = moving_mean(repeated, args.window), moving_mean(duplicates, args.window)
        print(
            f"| {run} | {len(repeated)} | {statistics.correlation(repeated, duplicates):.2f} "
            f"| {statistics.correlation(smooth_r, smooth_d):.2f} "
            f"| {smooth_r[0]:.3f} → {smooth_r[-1]:.3f} | {smooth_d[0]:.3f} → {smooth_d[-1]:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
