"""The search: the largest b whose probe fits, in few probes.

A steady-state micro-step's memory is ``static`` (weights, gradients, optimizer
state) plus activations that grow with b; the optimizer step adds a bump that
does not grow with b, which is where a knee comes from when only the total
peak is known. Probes report the forward + backward peak separately
(``activation_peak``), and that line has no knee:

1. b = start (1, or 2 for BatchNorm) fits, and with ``static`` it gives a first
   slope; the intercept it ignores (workspaces, the loss) only makes the slope
   steeper, so the first jump lands at or below the answer.
2. Two fitting points give the line; its answer is probed, then its neighbour
   proves it the largest (b fits, b + 1 does not).
3. A line whose two points did not change since it was last used says nothing
   new: the bracket is split instead. After three estimates in a row that did
   not halve the bracket, one split guarantees progress (real curves bend).

A probe that went over the budget measured its peak if it ended within the
probe's margin (probe.py); such a point brackets the budget from above, and the
line between it and the largest fitting point interpolates. Probes that ran out
of memory have no peak and only move the upper bound.
Every size returned was itself probed.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

from .probe import ProbeResult


def height(r: ProbeResult) -> Optional[int]:
    """The point a probe puts on the line: its forward/backward peak, or the whole peak for a bare oracle."""
    return r.activation_peak if r.activation_peak is not None else r.peak


def _line_estimate(points: list[tuple[int, int]], budget: int) -> Optional[int]:
    """Largest b under budget on the line through the two largest-b points."""
    if len(points) < 2:
        return None
    (b1, p1), (b2, p2) = sorted(points)[-2:]
    slope = (p2 - p1) / (b2 - b1)
    if slope <= 0:
        return None
    return int(math.floor(b2 + (budget - p2) / slope + 1e-9))


def search(probe: Callable[[int], ProbeResult], cap: int, budget: int, seed: Optional[int] = None,
           start: int = 1) -> tuple[int, list[ProbeResult]]:
    """Largest b in [start, cap] with ``probe(b).fit``, assuming fit is monotone in b.

    ``probe`` is the only oracle; ``seed`` (e.g. a fake-tensor estimate) is tried
    right after ``start`` and its neighbour confirms it. Returns (b, probes in order).
    """
    results: dict[int, ProbeResult] = {}
    order: list[ProbeResult] = []

    def run(b: int) -> ProbeResult:
        r = probe(b)
        results[b] = r
        order.append(r)
        return r

    first = run(start)
    if not first.fit:
        return 0, order
    lo, hi = start, cap + 1  # lo fits; hi does not (cap + 1 is a sentinel never probed)

    def record(b: int) -> ProbeResult:
        nonlocal lo, hi
        r = run(b)
        if r.fit:
            lo = max(lo, b)
        else:
            hi = min(hi, b)
        return r

    if cap > start and seed:
        second = min(cap, max(start + 1, seed))
        r = record(second)
        nb = second + 1 if r.fit else second - 1
        if second != cap and lo < nb < hi and nb not in results:
            record(nb)  # a seed claims `second` is the answer: its neighbour confirms it
    elif cap > start and first.static is None and first.activation_peak is None:
        record(cap)  # a bare oracle has no slope to start from: does the target fit?

    # A knee exists only for an oracle that reports the total peak alone.
    flat = first.peak if first.activation_peak is None and first.peak is not None else None
    used: set[tuple] = set()
    slow = 0  # estimates in a row that shrank the bracket by less than half
    overshot = False  # the last probe went so far over that it measured nothing
    while hi - lo > 1 and lo < cap:
        est: Optional[int] = None
        key = _key(results, flat)
        if key not in used:
            used.add(key)
            est = _estimate(results, budget, flat, lo, cap)
        if est is not None and slow >= 3 and est > lo + 1:  # never skip a confirmation of lo
            est, slow = None, 0
        if est is not None and hi in results and results[hi].peak is None and est > lo * 4:
            # The bound above went so far over that it measured nothing: a line that aims past
            # four times what fits is extrapolating a slope that bends; grow geometrically.
            est = lo * 4
        if est is None:
            if hi > cap or (overshot and lo * 4 < hi):
                # No bracket yet, or a line from the left overshot so far that nothing was measured
                # there (the curve bends up): grow geometrically from what fits.
                b = min(cap, lo * 4)
            else:
                b = (lo + hi) // 2
            b = max(lo + 1, min(hi - 1, b))
        else:
            b = max(lo + 1, min(hi - 1, est))
        width = hi - lo
        r = record(b)
        overshot = not r.fit and r.peak is None
        slow = slow + 1 if (est is not None and hi <= cap and (hi - lo) > width / 2) else 0
    return lo, order


def _series(results: dict[int, ProbeResult], flat: Optional[int]) -> list[list[tuple[int, int]]]:
    """Measured (b, bytes) points per curve: forward + backward, and the whole step's peak.

    The whole step's peak bends where the optimizer step stops dominating (the
    knee); for an oracle that reports only that peak, points on the flat part
    are left out of its line.
    """
    act = sorted((b, r.activation_peak) for b, r in results.items() if r.activation_peak is not None)
    tot = sorted((b, r.peak) for b, r in results.items() if r.peak is not None
                 and (flat is None or r.activation_peak is not None or not r.fit or r.peak > flat))
    return [act, tot]


def _key(results: dict[int, ProbeResult], flat: Optional[int]) -> tuple:
    return tuple(tuple(pts[-2:]) for pts in _series(results, flat))


def _estimate(results: dict[int, ProbeResult], budget: int, flat: Optional[int], lo: int, cap: int) -> Optional[int]:
    """The most any curve allows: lines through each curve's two largest points, or one point and the floor."""
    ests = []
    for pts in _series(results, flat):
        under = [p for p in pts if p[1] <= budget]
        over = [p for p in pts if p[1] > budget]
        if under and over and over[0][0] > under[-1][0]:
            # Bracketed: interpolate. Curves bend upwards (a max of lines), so the chord between
            # the two bracketing points lies above the curve and its crossing fits.
            low = _line_estimate([under[-1], over[0]], budget)
            if low is not None:
                ests.append(low)
            continue
        if len(pts) >= 2:
            e = _line_estimate(pts, budget)
            if e is not None:
                ests.append(e)
        elif len(pts) == 1 and results[pts[0][0]].static is not None:
            # One point and the static floor: what grows with b taken as proportional to b, a slope
            # no shallower than the real one, so the jump lands at or below the answer.
            b1, h1 = pts[0]
            s0 = results[b1].static
            ests.append(int((budget - s0) * b1 // (h1 - s0)) if h1 > s0 else cap)
    if not ests and flat is not None:
        pts = _series(results, flat)[1]
        if len(pts) == 1 and pts[0][0] != lo and results[lo].peak is not None:
            # One point on the line and one on the flat part: their chord is shallower than the
            # line, so it gives a lower bound on the answer.
            return _line_estimate([(lo, results[lo].peak), pts[0]], budget)
    return min(ests) if ests else None
