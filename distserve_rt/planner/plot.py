"""Pictures of a plan (matplotlib, Agg backend): attainment vs rate for the top
configurations, and where the chosen one's requests spend their time."""

from __future__ import annotations

from pathlib import Path

from distserve_rt.planner.simulator.results import BREAKDOWN


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ValueError(f"--plot needs matplotlib (pip install matplotlib): {exc}") from None
    return plt


def _attainment_axes(
    ax, curves: dict[str, list[tuple]], target: float, rate_unit: str = "req/s"
) -> None:
    """Points are (rate, attainment) or (rate, attainment, 95% half-width: error bars)."""
    for label, points in curves.items():
        if not points:
            continue
        cols = list(zip(*sorted(points), strict=True))
        rates, att = cols[0], [100 * a for a in cols[1]]
        errs = [100 * h for h in cols[2]] if len(cols) > 2 else None
        ax.errorbar(rates, att, yerr=errs, marker="o", capsize=2, label=label)
    ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel(f"rate ({rate_unit})")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.legend(fontsize=7)


def _breakdown_axes(ax, breakdown: dict[str, float], label: str) -> None:
    """One horizontal bar per stage, mean ms per request (``BREAKDOWN`` order)."""
    stages = [k for k in BREAKDOWN if k in breakdown]
    ms = [1e3 * breakdown[k] for k in stages]
    bars = ax.barh(stages, ms, color="tab:blue")
    # Decode takes seconds, queueing and transfer milliseconds: the numbers keep the
    # short bars readable.
    ax.bar_label(bars, labels=[f"{m:.3g} ms" for m in ms], fontsize=7, padding=2)
    ax.set_xlim(0, 1.2 * max(ms + [1e-3]))
    ax.invert_yaxis()  # queueing at the top, as a request meets it first
    ax.set_xlabel("mean time per request (ms)")
    ax.set_title(f"latency breakdown: {label}", fontsize=8)


def _save(fig, plt, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_attainment(
    curves: dict[str, list[tuple[float, float]]], target: float, path: str | Path
) -> Path:
    """One line per configuration: (rate req/s, attainment) points; a line at ``target``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    _attainment_axes(ax, curves, target)
    return _save(fig, plt, path)


def plot_plan(
    curves: dict[str, list[tuple]],
    target: float,
    breakdown: dict[str, float],
    chosen: str,
    title: str,
    path: str | Path,
    rate_unit: str = "req/s",
) -> Path:
    """Two panels: attainment vs rate of ``curves`` (label -> (rate, attainment[,
    half-width]) points) with the ``target`` line, and ``breakdown`` (stage -> mean
    seconds per request, the keys of ``BREAKDOWN``) of the ``chosen`` configuration;
    ``title`` says the setup."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    _attainment_axes(left, curves, target, rate_unit)
    _breakdown_axes(right, breakdown, chosen)
    fig.suptitle(title, fontsize=9)
    return _save(fig, plt, path)
