"""The sweep plot, in the form of the Aegaeon paper's Figure 11."""

from __future__ import annotations

from pathlib import Path


def plot_sweep(sweep: dict, out: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    any_points = next(iter(sweep.values()))["points"]
    by_rate = len({p["num_models"] for p in any_points}) == 1
    key, label = ("rate", "request rate per model (req/s)") if by_rate else \
        ("num_models", "number of models")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, result in sweep.items():
        points = sorted(result["points"], key=lambda p: p[key])
        ax.plot([p[key] for p in points], [100 * p["slo_attainment"] for p in points],
                marker="o", markersize=3, label=name)
    ax.axhline(90, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel(label)
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.set_title(f"SLO attainment ({subtitle})", fontsize=10)
    ax.legend()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
