"""Plain-text tables, as the studies, benchmarks and reports print them. Pure Python, so that
anything may import it (the benchmarks run on machines without MLflow)."""

from __future__ import annotations

from collections.abc import Sequence


def render_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """Left-aligned plain-text columns under a dashed header rule."""
    widths = [max([len(h)] + [len(row[i]) for row in body]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in body
    ]
    return "\n".join(lines)
