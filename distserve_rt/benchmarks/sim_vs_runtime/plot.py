"""The picture: SLO attainment vs rate, one panel per target, the runtime's mean over the
repeats with its min-max range against the simulator (as profiled, drift-rescaled,
calibrated at each rate on held-out requests, and at the speed the run's own steps had
where the run logged them)."""

from __future__ import annotations

import textwrap
from pathlib import Path


def plot_attainment(summaries: list[dict], title: str, path: Path) -> Path:
    """``summaries``: rows with ``target``, ``rate`` and `summarize_repeats`' keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(s["target"] for s in summaries))
    width = 4.2 * len(targets)
    fig, axes = plt.subplots(1, len(targets), figsize=(width, 3.8), squeeze=False)
    # The setup and SLOs in the title must be readable on a one-panel figure too.
    chars = int(width * 15)
    title = "\n".join(textwrap.fill(line, chars) for line in title.splitlines())
    for ax, target in zip(axes[0], targets, strict=True):
        rows = sorted((s for s in summaries if s["target"] == target), key=lambda s: s["rate"])
        rates = [s["rate"] for s in rows]
        runtime = [s["runtime_attainment"] for s in rows]
        mean = [100 * r["mean"] for r in runtime]
        err = [
            [100 * (r["mean"] - r["min"]) for r in runtime],
            [100 * (r["max"] - r["mean"]) for r in runtime],
        ]
        ax.errorbar(rates, mean, yerr=err, fmt="-s", color="k", capsize=3, label="runtime")
        for key, style, color, label in (
            ("simulated_attainment", "--o", "C0", "simulated"),
            ("simulated_rescaled_attainment", ":^", "C1", "simulated, drift-rescaled"),
            ("simulated_in_run_attainment", "-.v", "C2", "simulated at the run's step speed"),
            ("simulated_at_load_attainment", "-D", "C3", "simulated, calibrated at the rate"),
        ):
            if all(key in s for s in rows):
                means = [100 * s[key]["mean"] for s in rows]
                ax.plot(rates, means, style, color=color, label=label)
        ax.set_title(target, fontsize=9)
        ax.set_xlabel("rate (req/s)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("SLO attainment (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
