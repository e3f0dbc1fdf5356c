"""CPU schedule rules (our own, where dlight's CPU rules are weak)."""

from __future__ import annotations


def cpu_rules() -> list:
    return []
