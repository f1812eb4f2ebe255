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
    rows: Sequence[dict[str, Any]],
    keys: Sequence[str],
    metric: str,
    mode: str = "max",
    budget: int | None = None,
) -> str:
    """A study's trials as a plain-text table, ranked by the metric at the study's `budget`
    (the row's `at_budget`, the epoch every compared trial reached; `mode`: is higher or lower
    better), trials not compared last. A row has the keys `trial`, each of `keys`,
    `representatives`, `epochs`, `at_budget`, `final` and `best` (of `metric` over the
    trial's own epochs, shown beside it, never ranked), `seconds`, `status` and
    `stopped_early`."""
    at = f"{metric} @ epoch {budget}" if budget is not None else f"{metric} (no budget)"
    headers = ["trial", *keys, "representatives", "epochs", at, f"last {metric}",
               f"best {metric}", "time (s)", "status"]  # fmt: skip
    sign = -1.0 if mode == "max" else 1.0

    def rank(row: dict[str, Any]) -> tuple[bool, float]:
        value = row.get("at_budget")
        return value is None, sign * value if value is not None else 0.0

    body = [
        [
            r["trial"],
            *(str(r[key]) for key in keys),
            str(r["representatives"]),
            str(r["epochs"]),
            _num(r.get("at_budget")),
            _num(r["final"]),
            _num(r["best"]),
            "-" if r["seconds"] is None else f"{r['seconds']:.1f}",
            "STOPPED (ASHA)" if r["stopped_early"] else r["status"],
        ]
        for r in sorted(rows, key=rank)
    ]
    return render_table(headers, body)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
