"""The runner's tests in subfolders (fast/, watch/, eval/) share helpers of tests/vizer (test_train's tiny recipes)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
