"""Sparsity patterns: unstructured, or N of every M consecutive inputs kept."""

from __future__ import annotations


def nm_pattern(pattern: str) -> tuple[int, int] | None:
    """(N, M) of an 'N:M' pattern (N kept of every M consecutive inputs), None for unstructured."""
    if pattern == "unstructured":
        return None
    n, m = (int(p) for p in pattern.split(":"))
    return n, m
