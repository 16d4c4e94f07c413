"""What every typed configuration block shares: field checks that name the field and the fix, and
building from a mapping that rejects unknown keys (a typo would otherwise be ignored)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields


def check_fields(block: str, config, checks: Iterable[tuple[bool, str, str]]) -> None:
    """Raise on the first failed ``(ok, field, fix)`` check, as ``block.field: invalid value``."""
    for ok, field, fix in checks:
        if not ok:
            raise ValueError(f"{block}.{field}: invalid value in {config!r}; use {fix}")


def from_mapping(cls, block: str, values: dict):
    """``cls(**values)``, or an error that lists the unknown keys and the known ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{block}: unknown parameter(s) {unknown}; known are {sorted(known)}")
    return cls(**values)
