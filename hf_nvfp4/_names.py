"""How warnings and errors list module names."""

from __future__ import annotations


def shown_names(names: list[str], limit: int = 6) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
