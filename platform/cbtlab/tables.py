"""Plain-text tables, as the studies, benchmarks and reports print them. Pure Python, so that
anything may import it (the benchmarks run on machines without MLflow)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def render_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """Left-aligned plain-text columns under a dashed header rule."""
    widths = [max([len(h)] + [len(row[i]) for row in body]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in body
    ]
    return "\n".join(lines)


def format_table(
    rows: Sequence[dict[str, Any]], keys: Sequence[str], metric: str, mode: str = "max"
) -> str:
    """A study's trials as a plain-text table, best first (`mode`: is higher or lower better).
    A row has the keys `trial`, each of `keys`, `representatives`, `epochs`, `final` and `best`
    (of `metric`), `seconds`, `status` and `stopped_early`."""
    headers = ["trial", *keys, "representatives", "epochs", f"final {metric}", f"best {metric}",
               "time (s)", "status"]  # fmt: skip
    sign = -1.0 if mode == "max" else 1.0
    ordered = sorted(
        rows, key=lambda r: (r["best"] is None, sign * r["best"] if r["best"] is not None else 0)
    )
    body = [
        [
            r["trial"],
            *(str(r[key]) for key in keys),
            str(r["representatives"]),
            str(r["epochs"]),
            "-" if r["final"] is None else f"{r['final']:.4f}",
            "-" if r["best"] is None else f"{r['best']:.4f}",
            "-" if r["seconds"] is None else f"{r['seconds']:.1f}",
            "STOPPED (ASHA)" if r["stopped_early"] else r["status"],
        ]
        for r in ordered
    ]
    return render_table(headers, body)
