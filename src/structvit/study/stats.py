"""Statistics over seeds: mean and sample std per variant (:func:`aggregate`), Welch's t-test
(:func:`welch`) and the paper-table cells with their differences from the baselines
(:func:`paper_summary`)."""
from __future__ import annotations

import math
from typing import Optional, Sequence


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    n = len(xs)
    m = sum(xs) / n
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, s


def aggregate(rows: list[dict], order: Optional[list[tuple[str, str]]] = None) -> list[dict]:
    """One row per (task, variant): mean/std of top-1 over seeds, params, GFLOPs, mean train time.

    ``order`` lists (task, variant) pairs in the order of the study file (others follow)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["variant"]), []).append(r)
    keys = [k for k in (order or []) if k in groups] + sorted(k for k in groups if k not in (order or []))
    summary = []
    for key in keys:
        rs = groups[key]
        acc, acc_sd = mean_std([r["acc1"] for r in rs])
        ema, ema_sd = mean_std([r.get("ema_acc1", float("nan")) for r in rs])
        t, _ = mean_std([r["train_seconds"] for r in rs])
        spec = rs[0].get("spec", {})
        kw = spec.get("model_kwargs", {})
        summary.append({"task": key[0], "variant": key[1], "label": rs[0].get("label", key[1]), "D": rs[0]["D"],
                        "window": "x".join(map(str, kw["window"])) if kw.get("window") else "default",
                        "normalize": kw.get("normalize", "joint"), "seeds": len(rs),
                        "seed_list": " ".join(str(r["seed"]) for r in rs), "steps": rs[0]["steps"],
                        "acc1_mean": acc, "acc1_std": acc_sd, "ema_acc1_mean": ema, "ema_acc1_std": ema_sd,
                        "params": rs[0]["params"], "gflops": rs[0]["gflops"], "train_seconds": t})
    return summary


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Welch's t-test of two samples (unequal variances): (t, two-sided p).

    NaN where it is undefined: fewer than two values in a sample, or no spread in either."""
    from scipy import stats

    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan")
    (_, sa), (_, sb) = mean_std(a), mean_std(b)
    if sa == 0 and sb == 0:
        return float("nan"), float("nan")
    res = stats.ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.pvalue)


def paper_summary(rows: list[dict], study: dict) -> list[dict]:
    """One entry per (table, row, task): mean/std over seeds of the final top-1, its
    difference from each baseline (mean minus mean) with Welch's p, and the paper's number
    of the task's column (``paper_column`` of the task: IN-1K or SSv1).

    Rows without finished runs in a task are listed with ``seeds`` 0."""
    by = {}
    for r in rows:
        by.setdefault((r["task"], r["variant"]), []).append(r)
    baselines = list(study.get("baselines") or [])
    out = []
    for tid, table in (study.get("tables") or {}).items():
        for row in table["rows"]:
            for tname, task in study["tasks"].items():
                if row["variant"] not in {v["name"] for v in task["variants"]}:
                    continue
                rs = sorted(by.get((tname, row["variant"]), []), key=lambda r: r["seed"])
                acc = [r["acc1"] for r in rs]
                mean, sd = mean_std(acc) if acc else (float("nan"), float("nan"))
                col = task.get("paper_column")
                published = (row.get("paper") or {}).get(col) if col else None
                e = {"table": tid, "variant": row["variant"], "label": row.get("label", row["variant"]),
                     "task": tname, "paper_column": col or "",
                     "paper_top1": float("nan") if published is None else float(published),
                     "seeds": len(rs), "seed_list": " ".join(str(r["seed"]) for r in rs),
                     "steps": rs[0]["steps"] if rs else "", "acc1_mean": mean, "acc1_std": sd,
                     "params": rs[0]["params"] if rs else "", "gflops": rs[0]["gflops"] if rs else "",
                     "train_seconds": mean_std([r["train_seconds"] for r in rs])[0] if rs else float("nan"),
                     "note": row.get("note", "")}
                for b in baselines:
                    ref = [r["acc1"] for r in sorted(by.get((tname, b), []), key=lambda r: r["seed"])]
                    if row["variant"] == b or not acc or not ref:
                        e[f"delta_{b}"], e[f"p_{b}"] = float("nan"), float("nan")
                    else:
                        e[f"delta_{b}"] = mean - mean_std(ref)[0]
                        e[f"p_{b}"] = welch(acc, ref)[1]
                out.append(e)
    return out


