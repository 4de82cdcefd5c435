"""Markdown pieces shared by report.md, its sections and a sweep's summary.md: a table and the
number, duration and hardware formats."""

from __future__ import annotations


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |")
    return "\n".join(lines)


def fmt_count(n: float | None) -> str:
    """12345678 -> '12.3M'; small numbers stay exact."""
    if n is None:
        return "–"
    n = float(n)
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            v = n / div
            return f"{v:.3g}{suffix}" if v < 100 else f"{v:.0f}{suffix}"
    return f"{n:.0f}" if n == int(n) else f"{n:.3g}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60):02d}s"
    return f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"


def hardware_line(hw: dict) -> str:
    if hw.get("gpu"):
        n = hw.get("gpu_count", 1)
        return f"{n}× {hw['gpu']}" if n and n > 1 else str(hw["gpu"])
    cores = hw.get("cpu_count")
    return f"{cores} CPU cores" if cores else (hw.get("cpu") or "CPU")
