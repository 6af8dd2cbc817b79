"""Offline settings and helpers every test shares."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import shapescap  # noqa: E402,F401  (registers the shapes source and the tiny:shapes-* models for every test)


def shipped_recipes() -> list[str]:
    """The recipes the repository ships (git ls-files), so a user's draft in recipes/ never fails the suite."""
    import subprocess

    out = subprocess.run(["git", "ls-files", "recipes/*.yaml"], cwd=ROOT, capture_output=True, text=True)
    names = sorted(Path(p).stem for p in out.stdout.split() if Path(p).parent == Path("recipes"))
    if not names:  # not a git checkout (e.g. an unpacked archive): every recipe there is shipped
        names = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes `shipped_recipe` runs once per shipped recipe."""
    if "shipped_recipe" in metafunc.fixturenames:
        metafunc.parametrize("shipped_recipe", shipped_recipes())
