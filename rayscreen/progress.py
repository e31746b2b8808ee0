"""Progress of long stages: a tqdm bar on a terminal, plain lines in a log.

Ingest, illum, infer and profile all count items (well groups, tasks, wells) with
:class:`Progress`. On a terminal it is a tqdm bar. Elsewhere (``ray job submit`` logs, CI, a
file) tqdm's carriage-return redraws pile up into one long unreadable line, so there it
prints a plain line at most every ``every`` seconds and one at the end.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Iterable, Iterator, TypeVar

T = TypeVar("T")


def _is_terminal(file: IO) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Counts ``total`` items of a stage named ``desc`` and shows how far it is.

    ``enabled=False`` (``--quiet``) or ``total == 0`` shows nothing. Plain lines look like
    ``infer: 50/96 wells (52%, 4.1 wells/s)``. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, total: int, desc: str, unit: str = "item", *, enabled: bool = True,
                 every: float = 30.0, file: IO | None = None):
        self.total, self.desc, self.unit, self.every = int(total), desc, unit, float(every)
        self.file = file if file is not None else sys.stderr
        self.enabled = bool(enabled) and self.total > 0
        self.n = 0
        self._shown = 0  # the count of the last plain line
        self._start = self._last = time.monotonic()
        self._bar = None
        if self.enabled and _is_terminal(self.file):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=self.file)

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if self.n >= self.total or now - self._last >= self.every:
            self._line(now)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self._shown != self.n:  # stopped early (an error): say where
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        self._last, self._shown = now, self.n
        rate = self.n / max(now - self._start, 1e-9)
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}s ({100 * self.n / self.total:.0f}%, "
              f"{rate:.1f} {self.unit}s/s)", file=self.file, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_progress(items: Iterable[T], total: int, desc: str, unit: str = "item", *, enabled: bool = True) -> Iterator[T]:
    """Yield ``items``, counting each one after the caller is done with it."""
    with Progress(total, desc, unit, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update()
