"""The largest batch that fits: a search over batch sizes with a predicate that runs a step (no torch here, so
that the search is tested on its own)."""

from __future__ import annotations

from typing import Callable

FIT_RESOLUTION = 16  # bisect until the bracket is 1/16 of the batch


def fit_batch(fits: Callable[[int], bool], start: int, limit: int) -> tuple[int, int]:
    """(largest batch that fits, tries): doubling from ``start`` until a batch does not fit (or ``limit``),
    then bisection down to 1/FIT_RESOLUTION of the batch. 0 when ``start`` itself does not fit."""
    tries, lo, hi = 0, 0, start
    while hi <= limit:
        tries += 1
        if not fits(hi):
            break
        lo, hi = hi, 2 * hi
    if lo == 0 or hi > limit:
        return lo, tries
    while hi - lo > max(1, lo // FIT_RESOLUTION):
        mid = (lo + hi) // 2
        tries += 1
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, tries
