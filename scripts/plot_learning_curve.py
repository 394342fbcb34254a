"""The learning curve over clean training papers, from train.py run directories:

    python scripts/plot_learning_curve.py docs/learning_curve.png 0=RUN_DIR 1000=RUN_DIR 1999=RUN_DIR

Each argument is <hand-labelled training papers>=<run dir>. Plots the k-fold dev micro-F1 and macro-F1
of the model alone and of what predict.py ships (metrics.json), with the weak labels' as a reference,
and prints the table the plot is drawn from. Test scores are printed beside them, never plotted on
the axis a choice would be read from.
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    out, runs = Path(sys.argv[1]), sorted((int(a.split("=", 1)[0]), Path(a.split("=", 1)[1])) for a in sys.argv[2:])
    rows = [(n, json.loads((d / "metrics.json").read_text())["scores"]) for n, d in runs]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharex=True)
    for ax, metric in zip(axes, ("micro_f1", "macro_f1")):
        for kind, label in (("model_flat", "model alone, 0.5"), ("shipped", "what predict.py ships")):
            ax.plot([n for n, _ in rows], [s["dev"][kind][metric] for _, s in rows], marker="o", label=label)
        ax.axhline(rows[0][1]["dev"]["weak"][metric], color="grey", ls="--", label="weak labels (tuned on dev)")
        ax.set(title=f"dev (k-fold), {metric.replace('_', '-')}", xlabel="hand-labelled training papers")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print("| clean papers | dev model alone @0.5 | dev shipped | test model alone @0.5 | test shipped |")
    print("|---|---|---|---|---|")
    for n, s in rows:
        cell = lambda name, kind: f"{s[name][kind]['micro_f1']:.3f} / {s[name][kind]['macro_f1']:.3f}"  # noqa: E731
        print(f"| {n:,} | {cell('dev', 'model_flat')} | {cell('dev', 'shipped')} | "
              f"{cell('test/recent', 'model_flat')} | {cell('test/recent', 'shipped')} |")


if __name__ == "__main__":
    main()
