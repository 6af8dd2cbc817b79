"""shapescap.monitor_check answers bad input in one line (exit 2), never a traceback."""

import json
from pathlib import Path

import pandas as pd
import pytest

from shapescap.monitor_check import main


def logged_run(run: Path, steps: int = 14, torn: bool = False) -> Path:
    """A run logged at every step with a constant repeated rate and duplicate-free captions."""
    (run / "completions").mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 0.1, "health/repeated": 0.0}) for s in range(1, steps + 1)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + ('{"step": 15, "lo' if torn else ""))
    for s in range(1, steps + 1):
        turns = [[{"role": "assistant", "content": "a red circle"}]] * 4
        pd.DataFrame({"completion": turns}).to_parquet(run / "completions" / f"completions_{s:05d}.parquet")
    return run


def canary_run(run: Path, images: list[dict]) -> Path:
    run.mkdir(parents=True)
    (run / "canary.jsonl").write_text(json.dumps({"step": 0, "images": images}) + "\n")
    return run


def one_line_error(capsys, argv: list[str], named: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1 and err.startswith("monitor_check: error: "), err


def test_a_missing_run_folder(tmp_path, capsys):
    one_line_error(capsys, [str(tmp_path / "nope")], f"run folder not found: {tmp_path / 'nope'}")


@pytest.mark.parametrize("window", ["0", "-3"])
def test_a_window_below_one(tmp_path, capsys, window):
    one_line_error(capsys, [str(logged_run(tmp_path / "run")), "--window", window], "--window must be at least 1")


def test_a_constant_series_and_a_torn_last_line_still_give_the_table(tmp_path, capsys):
    # what a kill leaves (a torn line) is skipped; a constant series has no correlation, said in the cell
    assert main([str(logged_run(tmp_path / "run", torn=True)), "--window", "3"]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith(f"| {tmp_path / 'run'} | 14 | n/a (constant) | n/a (constant) |"), row


def test_canary_without_its_file(tmp_path, capsys):
    one_line_error(capsys, ["--canary", str(logged_run(tmp_path / "run"))], "no canary.jsonl")


def test_a_canary_line_without_images(tmp_path, capsys):
    one_line_error(capsys, ["--canary", str(canary_run(tmp_path / "run", []))], "the line of step 0 holds no images")


def test_a_canary_of_folder_pictures(tmp_path, capsys):
    images = [{"image_id": "holiday/beach.jpg", "caption": "a beach", "clip_s": 0.7}]
    one_line_error(capsys, ["--canary", str(canary_run(tmp_path / "run", images))], "is not a ShapesCap scene")
