"""Test tiers: `pytest -m "not slow"` is the inner loop (a few minutes on 2
cores); CI runs everything. A sweep over many compiled variants keeps one or
two cases in the inner loop and marks the rest slow."""

from __future__ import annotations

import pytest


def slow_except(cases, *fast) -> list:
    """`cases` for @pytest.mark.parametrize, each one not in `fast` marked slow.

    A case is one value, or a tuple of values for several argument names; the
    test ids stay what they were without the marks."""
    return [c if c in fast else pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.slow) for c in cases]
