"""``structvit study ablation``: the paper's central ablation (SA vs ConvSA vs StructSA) as one command.

A *study* is a YAML file (``configs/study/ablation.yaml``): one or more *tasks* (a data
module, a model, a training recipe, a number of steps, an input shape) and, per task, a
list of *variants* that differ only in the model's attention keyword arguments (SA:
``struct_blocks: [0, 0]``; ConvSA: ``attention: convsa``; StructSA with ``num_patterns``
D, ``window``, ``patterns``, ``kv_stride`` and ``normalize``; the models default to the
paper's channel-wise StructSA with D = 4 in every attention block).  Every variant is trained for every seed at the same
budget (same steps, data, recipe), one run after the other, each in its own folder::

    OUT/<task>/<variant>/seed<k>/
        metrics.csv        learning curves (train loss every few steps, validation every val_every)
        final.safetensors  final weights (and final.ema.safetensors)
        result.json        written last: the run is finished (``--resume`` skips it)

then ``OUT/results.csv`` (one row per run), ``OUT/results.md`` (mean +- std over seeds of
the final top-1, parameters, GFLOPs, train time per variant) and ``OUT/ablation.png``
(top-1 vs D with error bars; validation learning curves per variant).

Runs are reproducible from their seed on CPU: the seed fixes the initialisation, the
order of the training batches and every random draw of a step (see
``ClassificationModule``); the data itself (the built-in sets) does not depend on it.
"""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import importlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["Run", "load_study", "expand_plan", "variant_D", "build_model", "model_cost", "train_run",
           "run_study", "collect", "aggregate", "write_tables", "plot", "main"]

DEFAULT_CONFIG = "configs/study/ablation.yaml"
RESULT = "result.json"
_TASK_KEYS = {"title", "model", "model_kwargs", "recipe", "data", "steps", "val_every", "val_batches", "trainer",
              "input_shape", "num_classes", "variants"}
_VARIANT_KEYS = {"name", "label", "model_kwargs"}
_STUDY_KEYS = {"name", "description", "seeds", "threads", "tasks"}


class StudyError(ValueError):
    """A study file or a command-line choice that cannot be run (the message names what is wrong)."""


@dataclass
class Run:
    """One training run: a variant of a task at one seed."""

    task: str
    variant: str
    label: str
    seed: int
    spec: dict = field(repr=False)  # model, model_kwargs, recipe, data, steps, ... (all resolved)

    @property
    def key(self) -> str:
        return f"{self.task}/{self.variant}/seed{self.seed}"

    def folder(self, out: Path | str) -> Path:
        return Path(out) / self.task / self.variant / f"seed{self.seed}"

    @property
    def spec_hash(self) -> str:
        spec = copy.deepcopy(self.spec)  # where the data lies is not a setting of the run
        ((spec.get("data") or {}).get("init_args") or {}).pop("root", None)
        text = json.dumps({"spec": spec, "seed": self.seed}, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- plan
def load_study(path: str | Path) -> dict:
    """Read and check a study file; returns the study as a dict."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {str(path)!r} not found (the default is {DEFAULT_CONFIG}, "
                         "relative to the repository root)")
    with open(path) as f:
        study = yaml.safe_load(f)
    if not isinstance(study, dict) or not isinstance(study.get("tasks"), dict) or not study["tasks"]:
        raise StudyError(f"{path}: a study needs a 'tasks' mapping (task name -> model, data, recipe, variants)")
    bad = set(study) - _STUDY_KEYS
    if bad:
        raise StudyError(f"{path}: unknown top-level key(s) {sorted(bad)}; allowed: {sorted(_STUDY_KEYS)}")
    for tname, task in study["tasks"].items():
        if not isinstance(task, dict):
            raise StudyError(f"{path}: task {tname!r} must be a mapping")
        bad = set(task) - _TASK_KEYS
        if bad:
            raise StudyError(f"{path}: task {tname!r} has unknown key(s) {sorted(bad)}; allowed: {sorted(_TASK_KEYS)}")
        for key in ("model", "data", "steps", "variants", "input_shape"):
            if key not in task:
                raise StudyError(f"{path}: task {tname!r} needs {key!r}")
        if not isinstance(task["variants"], list) or not task["variants"]:
            raise StudyError(f"{path}: task {tname!r}: 'variants' must be a non-empty list")
        names = []
        for v in task["variants"]:
            if not isinstance(v, dict) or "name" not in v:
                raise StudyError(f"{path}: task {tname!r}: every variant needs a 'name', got {v!r}")
            bad = set(v) - _VARIANT_KEYS
            if bad:
                raise StudyError(f"{path}: variant {tname}/{v['name']} has unknown key(s) {sorted(bad)}; "
                                 f"allowed: {sorted(_VARIANT_KEYS)}")
            names.append(v["name"])
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise StudyError(f"{path}: task {tname!r} has duplicate variant names {sorted(dup)}")
    return study


def _check_seeds(seeds) -> list[int]:
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise StudyError(f"seeds must be a non-empty list of ints, got {seeds!r}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise StudyError(f"seeds must be non-negative ints, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"seeds must be distinct, got {list(seeds)}")
    return list(seeds)


def expand_plan(study: dict, *, seeds: Optional[Sequence[int]] = None, tasks: Optional[Sequence[str]] = None,
                variants: Optional[Sequence[str]] = None, steps: Optional[int] = None) -> list[Run]:
    """All runs of the study: every selected variant of every selected task at every seed.

    ``variants`` selects by name (``convsa``: in every task that has it) or by
    ``task/name``; ``steps`` overrides the number of training steps of every task.
    """
    seeds = _check_seeds(list(seeds) if seeds is not None else study.get("seeds", [0, 1, 2]))
    all_tasks = list(study["tasks"])
    if tasks:
        unknown = [t for t in tasks if t not in all_tasks]
        if unknown:
            raise StudyError(f"unknown task(s) {unknown}; this study has: {', '.join(all_tasks)}")
    chosen_tasks = [t for t in all_tasks if not tasks or t in tasks]
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise StudyError(f"--steps must be a positive int, got {steps!r}")
    wanted = list(variants or [])
    used = set()
    runs = []
    for tname in chosen_tasks:
        task = study["tasks"][tname]
        for v in task["variants"]:
            name = v["name"]
            hits = {w for w in wanted if w in (name, f"{tname}/{name}")}
            if wanted and not hits:
                continue
            used |= hits
            spec = {k: copy.deepcopy(task[k]) for k in task if k not in ("variants", "title")}
            spec["model_kwargs"] = {**(task.get("model_kwargs") or {}), **(v.get("model_kwargs") or {})}
            if steps is not None:
                spec["steps"] = int(steps)
            for seed in seeds:
                runs.append(Run(tname, name, v.get("label", name), seed, copy.deepcopy(spec)))
    missing = [w for w in wanted if w not in used]
    if missing:
        avail = ", ".join(f"{t}/{v['name']}" for t in chosen_tasks for v in study["tasks"][t]["variants"])
        raise StudyError(f"unknown variant(s) {missing}; available: {avail}")
    return runs


def variant_D(model_kwargs: dict) -> int:
    """The x-axis of the ablation: 0 for SA, 1 for ConvSA, D (``num_patterns``, the models'
    default 4) for StructSA."""
    sb = model_kwargs.get("struct_blocks", "all")
    if isinstance(sb, (list, tuple)) and tuple(sb) == (0, 0):
        return 0
    if model_kwargs.get("attention", "structsa") == "convsa":
        return 1
    return int(model_kwargs.get("num_patterns", 4))


# ---------------------------------------------------------------------------------- models
def _model_kwargs(spec: dict) -> dict:
    kw = dict(spec["model_kwargs"])
    for key in ("struct_blocks", "window", "window_v", "kv_stride", "depths", "embed_dims"):
        if isinstance(kw.get(key), list):
            kw[key] = tuple(kw[key])
    return kw


def build_model(spec: dict, device: str = "cpu", num_classes: Optional[int] = None, **extra):
    """The variant's model (as ``ClassificationModule`` builds it), e.g. on the ``meta`` device."""
    import timm
    import torch

    from . import models as _models  # noqa: F401  (registers the models)

    n = num_classes or spec.get("num_classes") or 10
    with torch.device(device):
        return timm.create_model(spec["model"], num_classes=n, **{**_model_kwargs(spec), **extra})


def model_cost(spec: dict) -> dict:
    """Parameters, GMACs and GFLOPs (2 per multiply-add) of one eval forward pass on
    ``input_shape``, counted on the meta device by the project's counter
    (:func:`structvit.models.summary.count_flops`), StructSA in the form the model runs
    (channel-wise or strided: the paper's key-convolution form)."""
    from .models.summary import count_flops, count_params

    model = build_model(spec, "meta")
    macs = count_flops(model, (1, *spec["input_shape"]), "meta")
    return {"params": count_params(model), "gmacs": macs / 1e9, "gflops": 2 * macs / 1e9}


# ---------------------------------------------------------------------------------- training
def _import(path: str):
    mod, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as err:
        raise StudyError(f"cannot import data class {path!r}: {err}") from err


def _datamodule(spec: dict):
    data = spec["data"]
    cls = _import(data["class_path"])
    return cls(**(data.get("init_args") or {}))


def train_run(run: Run, folder: Path | str, *, threads: Optional[int] = 1) -> dict:
    """Train one run into ``folder`` (emptied first) and return its result (also written to result.json)."""
    import warnings

    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from .engine import ClassificationModule, DeterministicData
    from .engine.callbacks import export_safetensors

    for pat in (".*does not have many workers.*", ".*LeafSpec.*", ".*is smaller than the logging interval.*",
                ".*Experiment logs directory .* exists.*", ".*GPU available but not used.*",
                ".*Checkpoint directory .* exists and is not empty.*"):
        warnings.filterwarnings("ignore", pat)
    if threads:
        torch.set_num_threads(int(threads))
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished run starts over (no result.json: nothing of it counts)
    folder.mkdir(parents=True)
    spec = run.spec
    steps = int(spec["steps"])
    L.seed_everything(run.seed, workers=True, verbose=False)
    dm = _datamodule(spec)
    num_classes = spec.get("num_classes") or dm.num_classes
    module = ClassificationModule(model=spec["model"], model_kwargs=_model_kwargs(spec), num_classes=num_classes,
                                  **(spec.get("recipe") or {}))
    val_every = min(int(spec.get("val_every") or steps), steps)
    tr = {"accelerator": "cpu", "devices": 1, "gradient_clip_val": 1.0, **(spec.get("trainer") or {})}
    trainer = L.Trainer(max_steps=steps, default_root_dir=str(folder),
                        logger=CSVLogger(str(folder), name="", version=""), callbacks=[DeterministicData()],
                        log_every_n_steps=max(1, min(10, val_every)), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        val_check_interval=val_every, check_val_every_n_epoch=None,
                        limit_val_batches=spec.get("val_batches"), **tr)
    t0 = time.perf_counter()
    trainer.fit(module, dm)
    train_s = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if "val/acc1" not in metrics:
        raise RuntimeError(f"{run.key}: no validation accuracy after {trainer.global_step} steps")
    export_safetensors(trainer, module, str(folder / "final.ckpt"))
    cost = model_cost(spec)
    result = {"task": run.task, "variant": run.variant, "label": run.label, "seed": run.seed,
              "D": variant_D(spec["model_kwargs"]), "steps": int(trainer.global_step),
              "acc1": metrics["val/acc1"], "ema_acc1": metrics.get("val/ema_acc1", float("nan")),
              "val_loss": metrics.get("val/loss", float("nan")), "train_seconds": train_s,
              "params": cost["params"], "gflops": cost["gflops"], "threads": torch.get_num_threads(),
              "spec_hash": run.spec_hash, "spec": spec}
    tmp = folder / (RESULT + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=list))
    os.replace(tmp, folder / RESULT)  # atomic: a result.json is always complete
    return result


def finished(run: Run, out: Path | str) -> Optional[dict]:
    """The run's result if it has finished in ``out`` with the same spec and seed, else None."""
    p = run.folder(out) / RESULT
    if not p.is_file():
        return None
    res = json.loads(p.read_text())
    if res.get("spec_hash") != run.spec_hash:
        raise StudyError(f"{p} holds a finished run with other settings (steps, recipe or model) than this "
                         f"study asks for; use another --out (or delete {p.parent})")
    return res


def run_study(runs: list[Run], out: Path | str, *, resume: bool = False, threads: Optional[int] = 1,
              log=print, trainer_fn=train_run) -> list[dict]:
    """Train every run in turn (skipping finished ones when ``resume``); returns all results."""
    out = Path(out)
    if not resume:
        done = [r.key for r in runs if (r.folder(out) / RESULT).is_file()]
        if done:
            raise StudyError(f"{out} already has {len(done)} finished run(s) of this plan (e.g. {done[0]}); "
                             "pass --resume to keep them and run the rest, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    results, t0 = [], time.perf_counter()
    for i, run in enumerate(runs, 1):
        res = finished(run, out) if resume else None
        if res is not None:
            log(f"[{i}/{len(runs)}] {run.key}: finished before, top-1 {100 * res['acc1']:.1f}% (skipped)")
        else:
            log(f"[{i}/{len(runs)}] {run.key}: training {run.spec['steps']} steps ...")
            res = trainer_fn(run, run.folder(out), threads=threads)
            log(f"[{i}/{len(runs)}] {run.key}: top-1 {100 * res['acc1']:.1f}% in {res['train_seconds']:.0f} s "
                f"(study so far {time.perf_counter() - t0:.0f} s)")
        results.append(res)
    return results


# ---------------------------------------------------------------------------------- results
def collect(out: Path | str) -> list[dict]:
    """Results of every finished run under ``out`` (sorted by task, variant, seed)."""
    rows = [json.loads(p.read_text()) for p in Path(out).glob(f"*/*/seed*/{RESULT}")]
    return sorted(rows, key=lambda r: (r["task"], r["variant"], r["seed"]))


def _mean_std(xs: list[float]) -> tuple[float, float]:
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
        acc, acc_sd = _mean_std([r["acc1"] for r in rs])
        ema, ema_sd = _mean_std([r.get("ema_acc1", float("nan")) for r in rs])
        t, _ = _mean_std([r["train_seconds"] for r in rs])
        spec = rs[0].get("spec", {})
        kw = spec.get("model_kwargs", {})
        summary.append({"task": key[0], "variant": key[1], "label": rs[0].get("label", key[1]), "D": rs[0]["D"],
                        "window": "x".join(map(str, kw["window"])) if kw.get("window") else "default",
                        "normalize": kw.get("normalize", "joint"), "seeds": len(rs),
                        "seed_list": " ".join(str(r["seed"]) for r in rs), "steps": rs[0]["steps"],
                        "acc1_mean": acc, "acc1_std": acc_sd, "ema_acc1_mean": ema, "ema_acc1_std": ema_sd,
                        "params": rs[0]["params"], "gflops": rs[0]["gflops"], "train_seconds": t})
    return summary


def write_tables(rows: list[dict], summary: list[dict], out: Path | str, *, command: str = "") -> tuple[Path, Path]:
    """``results.csv`` (one row per run) and ``results.md`` (the summary table per task)."""
    out = Path(out)
    cols = ["task", "variant", "label", "seed", "D", "steps", "acc1", "ema_acc1", "val_loss", "train_seconds",
            "params", "gflops", "threads"]
    csv_path = out / "results.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in cols})
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
    md_path = out / "results.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _curve(folder: Path) -> tuple[list[int], list[float]]:
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


def plot(summary: list[dict], out: Path | str) -> Path:
    """``ablation.png``: per task, top-1 vs D (SA = 0, ConvSA = 1) with std error bars, and the
    validation learning curves (mean over seeds) of every variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 8), squeeze=False)
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
        ax = axes[1, j]
        for s in part:
            curves = [_curve(p) for p in sorted((out / task / s["variant"]).glob("seed*"))]
            curves = [c for c in curves if c[0]]
            if not curves:
                continue
            n_pts = min(len(c[0]) for c in curves)
            steps = curves[0][0][:n_pts]
            mean = [sum(c[1][i] for c in curves) / len(curves) * 100 for i in range(n_pts)]
            ax.plot(steps, mean, marker=".", label=s["label"])
        ax.set_xlabel("training step")
        ax.set_ylabel("validation top-1 (%)")
        ax.set_title(f"{task}: learning curves (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "ablation.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(out: Path | str, runs: Optional[list[Run]] = None, *, command: str = "") -> dict:
    """Write results.csv, results.md and ablation.png for the finished runs in ``out``."""
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
    png = plot(summary, out)
    return {"rows": rows, "summary": summary, "csv": csv_path, "md": md_path, "png": png}


# ---------------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="structvit study ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"study file (default {DEFAULT_CONFIG})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the study's)")
    p.add_argument("--tasks", nargs="+", default=None, help="tasks to run (default: all), e.g. moving_digits")
    p.add_argument("--variants", nargs="+", default=None,
                   help="variants to run by name (in every task) or task/name (default: all)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every run (default: the task's)")
    p.add_argument("--out", default="runs/study/ablation", help="output folder (default runs/study/ablation)")
    p.add_argument("--resume", action="store_true", help="keep finished runs in --out and train the rest")
    p.add_argument("--data-root", default=None,
                   help="dataset folder of every selected task (sets data.init_args.root; SSv2/K400 need it)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per run (default: the study's, 1; 0: torch's default)")
    p.add_argument("--plan", action="store_true", help="print the runs and their model sizes, train nothing")
    p.add_argument("--report-only", action="store_true",
                   help="only (re)write results.csv/results.md/ablation.png from the finished runs in --out")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: structvit study ablation [options]   (`structvit study ablation --help` for the options)")
        return 0 if argv else 2
    if argv[0] != "ablation":
        print(f"structvit study: unknown study {argv[0]!r}; available: ablation", file=sys.stderr)
        return 2
    parser = _parser()
    args = parser.parse_args(argv[1:])
    try:
        study = load_study(args.config)
        runs = expand_plan(study, seeds=args.seeds, tasks=args.tasks, variants=args.variants, steps=args.steps)
        if args.data_root is not None:
            for r in runs:
                r.spec["data"].setdefault("init_args", {})["root"] = args.data_root
        command = "structvit study " + " ".join(argv)
        if args.plan:
            for task in dict.fromkeys(r.task for r in runs):
                for r in [x for x in runs if x.task == task and x.seed == runs[0].seed]:
                    c = model_cost(r.spec)
                    seeds = [x.seed for x in runs if x.task == r.task and x.variant == r.variant]
                    print(f"{r.task}/{r.variant:<22} D={variant_D(r.spec['model_kwargs'])} "
                          f"{c['params'] / 1e6:7.3f} M params {c['gflops']:8.3f} GFLOPs  "
                          f"{r.spec['steps']} steps  seeds {seeds}")
            print(f"{len(runs)} runs")
            return 0
        if not args.report_only:
            threads = args.threads if args.threads is not None else study.get("threads", 1)
            t0 = time.perf_counter()
            run_study(runs, args.out, resume=args.resume, threads=threads, log=lambda m: print(m, flush=True))
            print(f"study: {len(runs)} runs in {time.perf_counter() - t0:.0f} s", flush=True)
        res = report(args.out, runs, command=command)
    except StudyError as err:
        parser.error(str(err))
    print(res["md"].read_text())
    print(f"wrote {res['csv']}, {res['md']}, {res['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
