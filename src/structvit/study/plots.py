"""The study's figures: ``ablation.png`` (top-1 vs D and the learning curves, :func:`plot`) and
``paper.png`` (the paper's tables as panels, :func:`plot_paper`)."""
from __future__ import annotations

import csv
import math
import textwrap
from pathlib import Path

from .stats import mean_std


def learning_curve(folder: Path) -> tuple[list[int], list[float]]:
    """(steps, val/acc1) from a run's metrics.csv."""
    p = folder / "metrics.csv"
    steps, acc = [], []
    if not p.is_file():
        return steps, acc
    with open(p) as f:
        for row in csv.DictReader(f):
            v = row.get("val/acc1")
            if v not in (None, ""):
                steps.append(int(row["step"]) + 1)
                acc.append(float(v))
    return steps, acc


def plot(summary: list[dict], out: Path | str, *, name: str = "ablation.png", curves: bool = True) -> Path:
    """``out/name``: per task, top-1 vs D (SA = 0, ConvSA = 1) with std error bars and, with
    ``curves``, the validation learning curves (mean over seeds) of every variant, read from
    the runs' ``metrics.csv`` under ``out`` (a results page made from a CSV has no run folders)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    n_rows = 2 if curves else 1
    fig, axes = plt.subplots(n_rows, len(tasks), figsize=(5.5 * len(tasks), 4 * n_rows), squeeze=False)
    for j, task in enumerate(tasks):
        part = [s for s in summary if s["task"] == task]
        ax = axes[0, j]
        main = [s for s in part if s["D"] <= 1 or (s["window"] == "default" and s["normalize"] == "joint")]
        main = sorted(main, key=lambda s: s["D"])
        xs = [math.log2(s["D"]) + 1 if s["D"] else 0 for s in main]  # SA 0, ConvSA 1, D=2 2, D=4 3, D=8 4
        ax.errorbar(xs, [100 * s["acc1_mean"] for s in main], yerr=[100 * s["acc1_std"] for s in main],
                    fmt="o-", capsize=4, label="SA / ConvSA / StructSA (default window, joint softmax)")
        for k, s in enumerate(x for x in part if x not in main):
            x = (math.log2(s["D"]) + 1 if s["D"] else 0) + 0.12 * (k + 1)
            ax.errorbar([x], [100 * s["acc1_mean"]], yerr=[100 * s["acc1_std"]], fmt="s", capsize=4,
                        label=s["label"])
        ticks = sorted({0, 1, *[math.log2(s["D"]) + 1 for s in part if s["D"] > 1]})
        ax.set_xticks(ticks)
        ax.set_xticklabels(["SA" if t == 0 else "ConvSA\n(D=1)" if t == 1 else f"D={2 ** int(t - 1)}"
                            for t in ticks])
        ax.set_ylabel("top-1 (%)")
        n = max(s["seeds"] for s in part)
        ax.set_title(f"{task}: final top-1, mean ± std over {n} seed{'s' * (n > 1)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if curves:
            plot_learning_curves(axes[1, j], out, task, part)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_learning_curves(ax, out: Path, task: str, part: list[dict]) -> None:
    """The validation top-1 of every variant of ``task`` over the steps, mean over its seeds."""
    for s in part:
        runs = [learning_curve(p) for p in sorted((out / task / s["variant"]).glob("seed*"))]
        runs = [c for c in runs if c[0]]
        if not runs:
            continue
        n_pts = min(len(c[0]) for c in runs)
        steps = runs[0][0][:n_pts]
        mean = [sum(c[1][i] for c in runs) / len(runs) * 100 for i in range(n_pts)]
        ax.plot(steps, mean, marker=".", label=s["label"])
    ax.set_xlabel("training step")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(f"{task}: learning curves (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_paper(summary: list[dict], rows: list[dict], study: dict, out: Path | str, *,
               name: str = "paper.png") -> Path:
    """``out/name``: per task (rows of panels) and paper table (columns), the final top-1 of
    every row (mean ± std in blue, each seed as an orange dot), with the first baseline's
    mean (SA) as a dashed line; one y scale per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    tables = list((study.get("tables") or {}).items())
    tasks = list(study["tasks"])
    by = {}
    for r in rows:
        by.setdefault((r["task"], r["variant"]), []).append(100 * r["acc1"])
    widths = [max(2, len(t["rows"])) for _, t in tables]
    fig, axes = plt.subplots(len(tasks), len(tables), figsize=(1.1 * sum(widths) + 2, 3.8 * len(tasks)),
                             squeeze=False, sharey="row", gridspec_kw={"width_ratios": widths})
    base = (study.get("baselines") or [None])[0]
    for i, t in enumerate(tasks):
        for j, (tid, table) in enumerate(tables):
            ax = axes[i, j]
            labels = []
            for k, row in enumerate(table["rows"]):
                accs = by.get((t, row["variant"]), [])
                labels.append(row.get("label", row["variant"]))
                if not accs:
                    continue
                m, sd = mean_std(accs)
                ax.errorbar([k], [m], yerr=[sd], fmt="o", color="C0", capsize=4, zorder=3)
                ax.scatter([k + 0.15] * len(accs), accs, s=8, color="C1", zorder=2)
            if base and by.get((t, base)):  # the baseline's mean (SA), in every panel of the task
                ax.axhline(mean_std(by[(t, base)])[0], ls="--", color="gray", lw=1)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
            ax.set_xlim(-0.5, len(labels) - 0.5)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(f"{t}\nfinal top-1 (%)")
            if i == 0:
                ax.set_title(textwrap.fill(f"Table {tid}: {table.get('title', '')}", 14 * widths[j]), fontsize=9)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


