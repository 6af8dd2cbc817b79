"""Where a GRPO step's time goes: seconds per phase between two logging steps.

Phases nest (the reward runs inside generate-and-score, the log-prob forwards inside the training step); each
second is charged to the innermost phase only, so the phases never count a second twice and `other` (the wall
time no phase claims: optimizer step, data loading, advantages, logging) is what is left of the wall clock.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

PHASES = ("preprocess", "generation", "reward", "forward_backward")
KEYS = tuple(f"timing/{p}" for p in (*PHASES, "other"))


class PhaseClock:
    """Exclusive seconds per phase since the last `take()`; `sync` waits for queued GPU work at each boundary,
    so asynchronous kernels are charged to the phase that launched them."""

    def __init__(self, sync: Callable[[], None] = lambda: None, now: Callable[[], float] = time.perf_counter):
        self.sync, self.now = sync, now
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._stack: list[list] = []  # [phase, start of its current uncharged stretch]
        self.since = now()

    def restart(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.since = self.now()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.sync()
        now = self.now()
        if self._stack:  # the enclosing phase stops here
            outer = self._stack[-1]
            self._charge(outer[0], now - outer[1])
        self._stack.append([name, now])
        try:
            yield
        finally:
            self.sync()
            now = self.now()
            _, start = self._stack.pop()
            self._charge(name, now - start)
            if self._stack:  # ... and goes on from here
                self._stack[-1][1] = now

    def _charge(self, name: str, seconds: float) -> None:
        if name != "other":  # "other" may mark a region explicitly; it is the remainder anyway
            self.totals[name] += seconds

    def take(self) -> dict[str, float]:
        """The `timing/*` seconds since the last take (or restart), and start the next interval."""
        self.sync()
        now = self.now()
        if self._stack:  # a phase still open (a log inside it) is charged up to now, then goes on
            top = self._stack[-1]
            self._charge(top[0], now - top[1])
            top[1] = now
        wall = now - self.since
        out = {f"timing/{p}": s for p, s in self.totals.items()}
        out["timing/other"] = wall - sum(self.totals.values())
        self.totals, self.since = dict.fromkeys(PHASES, 0.0), now
        return out
