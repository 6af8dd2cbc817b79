"""Does the run monitor see what the truth shows? On ShapesCap the truth of every caption is known.

For each training run (logged at every step): the monitor's `health/repeated` from `metrics.jsonl`, and the
symbolic duplicate-object rate (`shapescap.metrics`) of the same step's sampled captions, read back from TRL's
completions log (`completions/completions_<step>.parquet`). Prints, per run, the Pearson correlation of the
two over steps, raw and as moving means over `--window` steps, and their first and last windows.

`--canary`: the canary set instead (`OUT/canary.jsonl`): per canary step, its CLIP-S (the judge's when recorded)
against the object recall, object hallucination and duplicate rate of the same captions of the same pictures,
each picture's truth rebuilt from its image id; correlations over the canary steps of each run.

    python -m shapescap.monitor_check RUN [RUN ...] [--window 10] [--canary]

Bad input (a missing run, no canary.jsonl, pictures that are not ShapesCap scenes, ...) is one line, exit 2.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from rewards.common import completion_text
from shapescap.metrics import parse_caption, shapes_metrics
from shapescap.scenes import Scene, make_scene, scene_seed
from vizer.records import read_records


class CheckError(Exception):
    """Input this check cannot read; the message is one line naming the run or file."""


def _records(path: Path) -> list[dict]:
    """The JSON lines of a run's file; a torn last line (what a kill leaves) is skipped."""
    if not path.is_file():
        raise CheckError(f"{path.parent}: no {path.name}")
    return [record for _, record in read_records(path)[0]]


def duplicate_rate(captions: list[str]) -> float:
    """Share of captions that name one (colour, shape) object twice, as `shapes/duplicate_object` counts it."""
    objects = [parse_caption(c).objects for c in captions]
    return sum(len(o) > len(set(o)) for o in objects) / len(objects) if objects else 0.0


def run_series(run: Path) -> tuple[list[float], list[float]]:
    """(monitor's repeated rate, symbolic duplicate rate) per step that has both."""
    import pandas as pd

    monitor = {}
    for row in _records(run / "metrics.jsonl"):
        if "health/repeated" in row and "step" in row:
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


def scene_of(image_id: str) -> Scene:
    """The scene behind a shapes source image id, `shapes/<split>/<index>` (the source's default 3 objects)."""
    parts = str(image_id).split("/")
    if len(parts) != 3 or parts[0] != "shapes" or not parts[2].isdigit():
        raise CheckError(
            f"canary picture {image_id!r} is not a ShapesCap scene (shapes/<split>/<index>): its truth is unknown"
        )
    return make_scene(scene_seed(parts[1], int(parts[2])))


CANARY_TRUTH = ("shapes/object_recall", "shapes/object_hallucination", "shapes/duplicate_object")


def canary_series(run: Path) -> tuple[str, list[int], list[float], dict[str, list[float]]]:
    """(score key, steps, canary CLIP-S, symbolic metric -> values) per canary measurement of a run."""
    lines = _records(run / "canary.jsonl")
    for line in lines:
        if not line.get("images"):
            raise CheckError(f"{run / 'canary.jsonl'}: the line of step {line.get('step', '?')} holds no images")
    key = "clip_s_judge" if lines and "clip_s_judge" in lines[0]["images"][0] else "clip_s"
    steps, scores, truth = [], [], {m: [] for m in CANARY_TRUTH}
    for line in lines:
        images = line["images"]
        corpus, _ = shapes_metrics([im["caption"] for im in images], [scene_of(im["image_id"]) for im in images])
        steps.append(line["step"])
        scores.append(statistics.fmean(im[key] for im in images))
        for metric in CANARY_TRUTH:
            truth[metric].append(corpus[metric])
    return key, steps, scores, truth


def canary_table(runs: list[Path]) -> list[str]:
    out = [
        "| run | canary score | images | steps | r with recall | r with object hallucination | r with duplicates "
        "| score, first → last | recall, first → last |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for run in runs:
        key, steps, scores, truth = canary_series(run)
        if len(steps) < 3:
            out.append(f"| {run} | {key} | | {len(steps)} | too few canary steps | | | | |")
            continue
        n = len(_records(run / "canary.jsonl")[0]["images"])
        r = [_correlation(scores, truth[m]) for m in CANARY_TRUTH]
        recall = truth[CANARY_TRUTH[0]]
        out.append(
            f"| {run} | {key} | {n} | {len(steps)} | {r[0]} | {r[1]} | {r[2]} "
            f"| {scores[0]:.3f} → {scores[-1]:.3f} | {recall[0]:.3f} → {recall[-1]:.3f} |"
        )
    return out


def _correlation(x: list[float], y: list[float]) -> str:
    try:
        return f"{statistics.correlation(x, y):.2f}"
    except statistics.StatisticsError:  # a constant series: no correlation to speak of
        return "n/a (constant)"


def moving_mean(values: list[float], window: int) -> list[float]:
    return [statistics.fmean(values[i : i + window]) for i in range(len(values) - window + 1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shapescap.monitor_check", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--canary", action="store_true", help="correlate the canary set with the truth instead")
    args = parser.parse_args(argv)
    try:
        if args.window < 1:
            raise CheckError(f"--window must be at least 1, got {args.window}")
        for run in args.runs:
            if not run.is_dir():
                raise CheckError(f"run folder not found: {run}")
        if args.canary:
            print("\n".join(canary_table(args.runs)))
        else:
            print("\n".join(repeated_table(args.runs, args.window)))
    except CheckError as err:
        print(f"monitor_check: error: {err}", file=sys.stderr)
        return 2
    return 0


def repeated_table(runs: list[Path], window: int) -> list[str]:
    out = [
        "| run | steps | r (per step) | r (moving mean) | repeated, first → last window | duplicates, first → last window |",
        "|---|---:|---:|---:|---|---|",
    ]
    for run in runs:
        repeated, duplicates = run_series(run)
        if len(repeated) < window + 2:
            out.append(f"| {run} | {len(repeated)} | too few logged steps with completions | | | |")
            continue
        smooth_r, smooth_d = moving_mean(repeated, window), moving_mean(duplicates, window)
        out.append(
            f"| {run} | {len(repeated)} | {_correlation(repeated, duplicates)} | {_correlation(smooth_r, smooth_d)} "
            f"| {smooth_r[0]:.3f} → {smooth_r[-1]:.3f} | {smooth_d[0]:.3f} → {smooth_d[-1]:.3f} |"
        )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
