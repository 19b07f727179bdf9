"""Attainment-vs-rate picture of the top configurations (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path


def plot_attainment(
    curves: dict[str, list[tuple[float, float]]], target: float, path: str | Path
) -> Path:
    """One line per configuration: (rate req/s, attainment) points; a line at ``target``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ValueError(f"--plot needs matplotlib (pip install matplotlib): {exc}") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        if points:
            rates, att = zip(*sorted(points), strict=True)
            ax.plot(rates, [100 * a for a in att], marker="o", label=label)
    ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
