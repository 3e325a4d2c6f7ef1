"""Names: how warnings and errors list modules, and classes recognised by name."""

from __future__ import annotations

from collections.abc import Collection


def shown_names(names: list[str], limit: int = 6) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def derives_from(obj: object, class_names: Collection[str]) -> bool:
    """Whether ``obj``'s class or one of its bases is named in ``class_names``: recognises
    classes of optional packages without importing them (PEFT's tuner layers) and subclasses
    that wrappers swap in (FSDP2's ``fully_shard``)."""
    return any(c.__name__ in class_names for c in type(obj).__mro__)
