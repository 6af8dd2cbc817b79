"""Append-only JSON-lines files (metrics.jsonl, eval caption caches, captions.jsonl): one JSON object per line,
written as the work happens, so a killed run can leave its last line cut short. One reader serves them all."""

from __future__ import annotations

import json
from pathlib import Path


def read_records(path: Path) -> tuple[list[tuple[str, dict]], int]:
    """(line, record) for each line holding a JSON object, in file order, and how many lines did not (a write
    cut short); ([], 0) when the file is missing."""
    if not path.is_file():
        return [], 0
    records, unreadable = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append((line, record))
        else:
            unreadable += 1
    return records, unreadable
