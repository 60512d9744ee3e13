"""The study's tables: the finished runs collected (:func:`collect`), ``results.csv`` /
``results.md`` per run and per variant (:func:`write_tables`), the paper's tables
(:func:`write_paper_tables`) and the whole report of a study folder (:func:`report`)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional

from .plan import RESULT, Run, StudyError
from .plots import plot, plot_paper
from .stats import aggregate, paper_summary

#: the columns of ``results.csv``: one row per finished run
RESULT_COLUMNS = ("task", "variant", "label", "seed", "D", "steps", "acc1", "ema_acc1", "val_loss", "train_seconds",
                  "params", "gflops", "threads")
_INT_COLUMNS = {"seed", "D", "steps", "params", "threads"}
_TEXT_COLUMNS = {"task", "variant", "label"}


def collect(out: Path | str) -> list[dict]:
    """Results of every finished run under ``out`` (sorted by task, variant, seed)."""
    rows = [json.loads(p.read_text()) for p in Path(out).glob(f"*/*/seed*/{RESULT}")]
    return sorted(rows, key=lambda r: (r["task"], r["variant"], r["seed"]))


def _write_csv(rows: list[dict], columns, path: Path | str) -> Path:
    """``columns`` of every row (empty where a row lacks one) into the CSV file ``path``."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in columns})
    return Path(path)


def write_results_csv(rows: list[dict], path: Path | str) -> Path:
    """``results.csv``: one row per run, the columns :data:`RESULT_COLUMNS`."""
    return _write_csv(rows, RESULT_COLUMNS, path)


def read_results_csv(path: Path | str) -> list[dict]:
    """The runs of a ``results.csv`` written by :func:`write_results_csv`, numbers parsed
    (sorted by task, variant, seed, as :func:`collect` returns them)."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"results file {str(path)!r} not found (written by `structvit study ... --write`)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(RESULT_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise StudyError(f"{path}: not a study results file, missing column(s) {sorted(missing)}")
        rows = []
        for line, raw in enumerate(reader, 2):
            try:
                rows.append({k: raw[k] if k in _TEXT_COLUMNS else int(raw[k]) if k in _INT_COLUMNS
                             else float(raw[k] or "nan") for k in RESULT_COLUMNS})
            except ValueError as err:
                raise StudyError(f"{path}, line {line}: {err}") from err
    return sorted(rows, key=lambda r: (r["task"], r["variant"], r["seed"]))


def results_markdown(summary: list[dict], *, command: str = "") -> str:
    """The summary table per task (one row per variant: mean ± std over seeds), as markdown."""
    lines = []
    if command:
        lines += [f"Command: `{command}`", ""]
    for task in dict.fromkeys(s["task"] for s in summary):
        part = [s for s in summary if s["task"] == task]
        lines += [f"### {task}", "",
                  "| variant | D | window | softmax | top-1 (%) mean ± std | EMA top-1 (%) | seeds | steps "
                  "| params (M) | GFLOPs | train time / run (s) |",
                  "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for s in part:
            lines.append(f"| {s['label']} | {s['D']} | {s['window'] if s['D'] else '-'} | "
                         f"{s['normalize'] if s['D'] > 1 else '-'} | {100 * s['acc1_mean']:.1f} ± "
                         f"{100 * s['acc1_std']:.1f} | {100 * s['ema_acc1_mean']:.1f} ± {100 * s['ema_acc1_std']:.1f} "
                         f"| {s['seeds']} | {s['steps']} | {s['params'] / 1e6:.3f} | {s['gflops']:.3f} "
                         f"| {s['train_seconds']:.0f} |")
        lines.append("")
    lines.append("top-1: final validation accuracy after the last step (raw weights; EMA: the EMA weights), "
                 "mean ± sample std over seeds. GFLOPs: one clip/image, 2 per multiply-add, StructSA as the model runs it. "
                 "Train time: wall time of one run's Trainer.fit (training and the periodic validations), "
                 "mean over seeds, with the threads of results.csv.")
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], summary: list[dict], out: Path | str, *, command: str = "") -> tuple[Path, Path]:
    """``results.csv`` (one row per run) and ``results.md`` (the summary table per task)."""
    out = Path(out)
    csv_path = write_results_csv(rows, out / "results.csv")
    md_path = out / "results.md"
    md_path.write_text(results_markdown(summary, command=command))
    return csv_path, md_path


def report(out: Path | str, runs: Optional[list[Run]] = None, *, command: str = "",
           study: Optional[dict] = None) -> dict:
    """Write results.csv and results.md for the finished runs in ``out``, and the plot:
    ``ablation.png`` or, for a study with ``tables`` (the paper's), ``paper_tables.md``,
    ``paper_summary.csv`` and ``paper.png``."""
    out = Path(out)
    rows = collect(out)
    if runs is not None:
        keys = {(r.task, r.variant, r.seed) for r in runs}
        rows = [r for r in rows if (r["task"], r["variant"], r["seed"]) in keys]
    if not rows:
        raise StudyError(f"no finished runs in {out} (nothing to tabulate)")
    order = list(dict.fromkeys((r.task, r.variant) for r in runs)) if runs else None
    summary = aggregate(rows, order)
    csv_path, md_path = write_tables(rows, summary, out, command=command)
    res = {"rows": rows, "summary": summary, "csv": csv_path, "md": md_path}
    if study is not None and study.get("tables"):
        paper = paper_summary(rows, study)
        res["paper"] = paper
        res["paper_csv"], res["paper_md"] = write_paper_tables(paper, study, out, command=command)
        res["png"] = plot_paper(paper, rows, study, out)
    else:
        res["png"] = plot(summary, out)
    return res


def _fmt(x: float, spec: str = ".1f", scale: float = 1.0) -> str:
    return "" if x is None or x == "" or (isinstance(x, float) and math.isnan(x)) else format(scale * x, spec)


def paper_summary_columns(study: dict) -> list[str]:
    """The columns of ``paper_summary.csv``: a delta and a p column per baseline."""
    baselines = list(study.get("baselines") or [])
    return (["table", "variant", "label", "task", "paper_column", "paper_top1", "seeds", "seed_list", "steps",
             "acc1_mean", "acc1_std"] + [f"{k}_{b}" for b in baselines for k in ("delta", "p")]
            + ["params", "gflops", "train_seconds", "note"])


def write_paper_summary_csv(summary: list[dict], study: dict, path: Path | str) -> Path:
    """One row per (paper table, row, task) of :func:`structvit.study.stats.paper_summary`."""
    return _write_csv(summary, paper_summary_columns(study), path)


def paper_markdown(summary: list[dict], study: dict, *, command: str = "") -> str:
    """One markdown table per paper table: the published top-1 beside ours (mean ± std over
    seeds) and the difference from each baseline with Welch's p."""
    baselines = list(study.get("baselines") or [])
    blabel = {}
    for task in study["tasks"].values():
        for v in task["variants"]:
            blabel.setdefault(v["name"], v.get("label", v["name"]))
    tasks = list(study["tasks"])
    lines = [f"Command: `{command}`", ""] if command else []
    for tid, table in (study.get("tables") or {}).items():
        lines += [f"### Table {tid}: {table.get('title', '')}".rstrip(": "), ""]
        head = "| row |"
        rule = "|---|"
        for t in tasks:
            col = study["tasks"][t].get("paper_column") or "paper"
            head += f" paper {col} | {t} top-1 (%) | " + " | ".join(f"Δ vs {blabel.get(b, b)}, p" for b in baselines) + " |"
            rule += "---:|---:|" + "---:|" * len(baselines)
        lines += [head, rule]
        for row in table["rows"]:
            line = f"| {row.get('label', row['variant'])} |"
            for t in tasks:
                e = next((x for x in summary if x["table"] == tid and x["variant"] == row["variant"]
                          and x["task"] == t), None)
                if e is None:
                    line += " | |" + " |" * len(baselines)
                    continue
                acc = (f"{_fmt(e['acc1_mean'], scale=100)} ± {_fmt(e['acc1_std'], scale=100)} (n={e['seeds']})"
                       if e["seeds"] else "not run")
                line += f" {_fmt(e['paper_top1'])} | {acc} |"
                for b in baselines:
                    d, pv = e.get(f"delta_{b}"), e.get(f"p_{b}")
                    p_text = f"p={_fmt(pv, '.2g')}" if _fmt(pv) else "p n/a"
                    line += (" - |" if row["variant"] == b else
                             f" {_fmt(d, '+.1f', 100)}, {p_text} |" if _fmt(d) else " |")
            lines.append(line)
        notes = [f"{row.get('label', row['variant'])}: {row['note']}" for row in table["rows"] if row.get("note")]
        if table.get("note"):
            notes.insert(0, table["note"])
        lines += [""] + ([f"Notes: {' '.join(notes)}", ""] if notes else [])
    lines.append("Ours: final validation top-1 after the last step, mean ± sample std over the seeds (n); "
                 "Δ: difference of means in points, p: Welch's two-sided t-test over seeds. Paper: the published "
                 "top-1 (ImageNet-1K / Something-Something V1, DeiT-S with every attention replaced); empty where "
                 "the number is not given here (see the note).")
    return "\n".join(lines) + "\n"


def write_paper_tables(summary: list[dict], study: dict, out: Path | str, *, command: str = "") -> tuple[Path, Path]:
    """``paper_tables.md`` (:func:`paper_markdown`) and ``paper_summary.csv`` in ``out``."""
    out = Path(out)
    csv_path = write_paper_summary_csv(summary, study, out / "paper_summary.csv")
    md_path = out / "paper_tables.md"
    md_path.write_text(paper_markdown(summary, study, command=command))
    return csv_path, md_path
