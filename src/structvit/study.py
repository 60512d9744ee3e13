"""``structvit study ablation`` and ``structvit study paper``: the paper's ablations as one command each.

A *study* is a YAML file (``configs/study/ablation.yaml``, ``configs/study/paper.yaml``): one
or more *tasks* (a data module, a model, a training recipe, a number of steps, an input
shape) and, per task, a list of *variants* that differ only in the model's attention keyword
arguments (SA: ``struct_blocks: [0, 0]`` or ``attention: sa``; ConvSA: ``attention: convsa``;
StructSA with ``num_patterns`` D, ``window``, ``window_v``, ``patterns``, ``kv_stride`` and
``normalize``) and, for the one form those cannot express, ``value_patterns: head``
(channel-wise correlation with per-head aggregation, :func:`tie_value_patterns`).  Every
variant is trained for every seed at the same budget (same steps, data, recipe), each in its
own folder, one run at a time or ``jobs`` at a time in separate processes::

    OUT/<task>/<variant>/seed<k>/
        metrics.csv        learning curves (train loss every few steps, validation every val_every)
        final.safetensors  final weights (and final.ema.safetensors)
        result.json        written last: the run is finished (``--resume`` skips it)

then ``OUT/results.csv`` (one row per run), ``OUT/results.md`` (mean +- std over seeds of
the final top-1, parameters, GFLOPs, train time per variant) and ``OUT/ablation.png``
(top-1 vs D with error bars; validation learning curves per variant).

``study paper`` (``configs/study/paper.yaml``) is the paper's Sec. 4.2 on its ablation
backbone (a DeiT-style ViT with every attention replaced): the study file's ``tables`` put
the variants into the rows of Tables 1a, 1b, 1c and 6a with the published top-1, and
``baselines`` names the variants every row is tested against (Welch's t-test over seeds);
it writes ``OUT/paper_tables.md``, ``OUT/paper_summary.csv`` and ``OUT/paper.png``.
``--quick`` runs the study's ``quick`` block (one seed, a few steps): a smoke test.

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
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["Run", "load_study", "quick_study", "expand_plan", "variant_D", "tie_value_patterns", "build_model",
           "model_cost", "train_run", "run_study", "collect", "aggregate", "write_tables", "plot", "welch",
           "paper_summary", "write_paper_tables", "plot_paper", "report", "main"]

DEFAULT_CONFIG = "configs/study/ablation.yaml"
RESULT = "result.json"
PAPER_CONFIG = "configs/study/paper.yaml"
_TASK_KEYS = {"title", "model", "model_kwargs", "recipe", "data", "steps", "val_every", "val_batches", "trainer",
              "input_shape", "num_classes", "variants", "paper_column"}
_VARIANT_KEYS = {"name", "label", "model_kwargs", "value_patterns"}
_STUDY_KEYS = {"name", "description", "seeds", "threads", "jobs", "order", "tasks", "quick", "tables", "baselines"}
_QUICK_KEYS = {"seeds", "steps", "val_every", "val_batches"}
#: ``value_patterns`` of a variant: "head" shares each head's aggregators u_v over its channels
#: (channel-wise correlation, dot-product-like aggregation; Table 6a's middle row)
VALUE_PATTERNS = ("head",)


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
            if v.get("value_patterns") is not None and v["value_patterns"] not in VALUE_PATTERNS:
                raise StudyError(f"{path}: variant {tname}/{v['name']}: value_patterns must be one of "
                                 f"{VALUE_PATTERNS} (or absent), got {v['value_patterns']!r}")
            names.append(v["name"])
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise StudyError(f"{path}: task {tname!r} has duplicate variant names {sorted(dup)}")
    if study.get("order", "variant") not in ("variant", "seed"):
        raise StudyError(f"{path}: order must be 'variant' (all seeds of a variant, then the next) or 'seed' "
                         f"(every variant at one seed, then the next seed), got {study['order']!r}")
    jobs = study.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise StudyError(f"{path}: jobs must be a positive int (parallel training processes), got {jobs!r}")
    quick = study.get("quick")
    if quick is not None:
        if not isinstance(quick, dict) or set(quick) - _QUICK_KEYS:
            raise StudyError(f"{path}: quick must be a mapping with keys among {sorted(_QUICK_KEYS)}, got {quick!r}")
    _check_tables(study, path)
    return study


def _check_tables(study: dict, path) -> None:
    """``tables`` (the paper's tables: rows = variants, with the published numbers) and
    ``baselines`` (variant names every row is tested against) name variants of every task."""
    names = {v["name"] for task in study["tasks"].values() for v in task["variants"]}
    for b in study.get("baselines") or []:
        if b not in names:
            raise StudyError(f"{path}: baseline {b!r} is not a variant of the study (variants: {sorted(names)})")
    tables = study.get("tables")
    if tables is None:
        return
    if not isinstance(tables, dict) or not tables:
        raise StudyError(f"{path}: tables must be a mapping of table id -> {{title, rows}}, got {tables!r}")
    for tid, table in tables.items():
        if not isinstance(table, dict) or not isinstance(table.get("rows"), list) or not table["rows"]:
            raise StudyError(f"{path}: table {tid!r} needs a non-empty 'rows' list")
        for row in table["rows"]:
            if not isinstance(row, dict) or row.get("variant") not in names:
                raise StudyError(f"{path}: table {tid!r}: every row needs a 'variant' of the study "
                                 f"({sorted(names)}), got {row!r}")
            bad = set(row) - {"variant", "label", "paper", "note"}
            if bad:
                raise StudyError(f"{path}: table {tid!r}, row {row['variant']!r}: unknown key(s) {sorted(bad)}; "
                                 "allowed: variant, label, paper, note")


def quick_study(study: dict) -> dict:
    """The study's ``--quick`` plan: its ``quick`` block (seeds, steps, val_every, val_batches)
    applied to every task; a smoke run of every variant, not a result."""
    quick = study.get("quick")
    if not quick:
        raise StudyError("this study has no 'quick' block (seeds/steps/val_every/val_batches of a smoke run)")
    out = copy.deepcopy(study)
    if "seeds" in quick:
        out["seeds"] = list(quick["seeds"])
    for task in out["tasks"].values():
        for key in ("steps", "val_every", "val_batches"):
            if key in quick:
                task[key] = quick[key]
    return out


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
            spec.pop("paper_column", None)  # where the paper's numbers go: not a setting of the run
            if v.get("value_patterns") is not None:
                spec["value_patterns"] = v["value_patterns"]
            if steps is not None:
                spec["steps"] = int(steps)
            for seed in seeds:
                runs.append(Run(tname, name, v.get("label", name), seed, copy.deepcopy(spec)))
    missing = [w for w in wanted if w not in used]
    if missing:
        avail = ", ".join(f"{t}/{v['name']}" for t in chosen_tasks for v in study["tasks"][t]["variants"])
        raise StudyError(f"unknown variant(s) {missing}; available: {avail}")
    if study.get("order", "variant") == "seed":
        # every variant at the first seed, then the next seed: a study stopped early has
        # (nearly) the same seeds in every row
        runs.sort(key=lambda r: seeds.index(r.seed))  # stable: task and variant order kept
    return runs


def variant_D(model_kwargs: dict) -> int:
    """The x-axis of the ablation: 0 for SA, 1 for ConvSA, D (``num_patterns``, the models'
    default 4) for StructSA."""
    sb = model_kwargs.get("struct_blocks", "all")
    if (isinstance(sb, (list, tuple)) and tuple(sb) == (0, 0)) or model_kwargs.get("attention") == "sa":
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


def _tie_module():
    import torch

    class SharedOverChannels(torch.nn.Module):
        """Parametrization of a channel-wise ``u_v`` (heads, C, D, *window) by one aggregator
        per head and pattern, (heads, 1, D, *window), broadcast over the head's C channels."""

        def __init__(self, channels: int):
            super().__init__()
            self.channels = channels

        def forward(self, u):
            return u.expand(u.shape[0], self.channels, *u.shape[2:])

        def right_inverse(self, u):
            # channel 0 of the channel-wise init: the per-head layout's init distribution
            return u[:, :1].detach().clone()

    return SharedOverChannels


def tie_value_patterns(model) -> int:
    """Share every channel-wise StructSA layer's value aggregators over the channels of a head.

    The op takes one layout for ``u_k`` and ``u_v`` (channel-wise with per-head value
    patterns is refused), so the mixed form of the paper's Table 6a (channel-wise
    correlation, dot-product aggregation) is expressed in the channel-wise layout with
    ``u_v`` parametrized as (heads, 1, D, *window) broadcast over the channels: the same
    function and the same trainable parameters as per-head aggregators. Returns the number
    of layers tied; raises if the model has no channel-wise StructSA layer.
    """
    from torch.nn.utils import parametrize

    from .nn import StructSA

    tie = _tie_module()
    n = 0
    for m in model.modules():
        if isinstance(m, StructSA) and m.patterns == "channel":
            parametrize.register_parametrization(m, "u_v", tie(m.u_v.shape[1]))
            n += 1
    if n == 0:
        raise StudyError("value_patterns: 'head' needs channel-wise StructSA layers (patterns: channel); "
                         "the model has none")
    return n


def prepare_model(model, spec: dict):
    """Study-level changes of a built model that model kwargs cannot express (``value_patterns``)."""
    if spec.get("value_patterns") == "head":
        tie_value_patterns(model)
    return model


def build_model(spec: dict, device: str = "cpu", num_classes: Optional[int] = None, **extra):
    """The variant's model (as ``ClassificationModule`` builds it), e.g. on the ``meta`` device."""
    import timm
    import torch

    from . import models as _models  # noqa: F401  (registers the models)

    n = num_classes or spec.get("num_classes") or 10
    with torch.device(device):
        model = timm.create_model(spec["model"], num_classes=n, **{**_model_kwargs(spec), **extra})
    return prepare_model(model, spec)


def model_cost(spec: dict) -> dict:
    """Parameters, GMACs and GFLOPs (2 per multiply-add) of one eval forward pass on
    ``input_shape``, counted on the meta device by the project's counter
    (:func:`structvit.models.summary.count_flops`), StructSA in the form the model runs
    (channel-wise or strided: the paper's key-convolution form)."""
    from .models.summary import count_flops, count_params

    model = build_model(spec, "meta")
    # value_patterns ties parameters, not operations: count the FLOPs on the untied model
    # (the FLOP counter's module tracker cannot follow a parametrization)
    plain = build_model({k: v for k, v in spec.items() if k != "value_patterns"}, "meta") \
        if spec.get("value_patterns") else model
    macs = count_flops(plain, (1, *spec["input_shape"]), "meta")
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
    if spec.get("value_patterns"):
        prepare_model(module.model, spec)
        if module.ema_model is not None:  # the EMA copy starts as the model, tied the same way
            prepare_model(module.ema_model, spec)
            module.ema_model.load_state_dict(module.model.state_dict())
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


def _train_in_worker(trainer_fn, run: Run, folder: Path, threads: Optional[int]) -> dict:
    """One run in a worker process (top level: picklable)."""
    return trainer_fn(run, folder, threads=threads)


def run_study(runs: list[Run], out: Path | str, *, resume: bool = False, threads: Optional[int] = 1,
              log=print, trainer_fn=train_run, jobs: int = 1) -> list[dict]:
    """Train every run (skipping finished ones when ``resume``); returns all results in plan order.

    ``jobs`` > 1 trains that many runs at a time, each in its own process (spawned, so
    every run starts from a fresh interpreter as with ``jobs=1`` it starts from a fresh
    seed); each run writes its result.json when it finishes, so a killed study keeps
    every finished run and ``resume`` continues it.
    """
    out = Path(out)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise StudyError(f"jobs must be a positive int, got {jobs!r}")
    if not resume:
        done = [r.key for r in runs if (r.folder(out) / RESULT).is_file()]
        if done:
            raise StudyError(f"{out} already has {len(done)} finished run(s) of this plan (e.g. {done[0]}); "
                             "pass --resume to keep them and run the rest, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict] = {}
    todo = []
    t0 = time.perf_counter()
    for i, run in enumerate(runs, 1):
        res = finished(run, out) if resume else None
        if res is not None:
            log(f"[{i}/{len(runs)}] {run.key}: finished before, top-1 {100 * res['acc1']:.1f}% (skipped)")
            results[i] = res
        else:
            todo.append((i, run))

    def done_msg(i, run, res):
        return (f"[{i}/{len(runs)}] {run.key}: top-1 {100 * res['acc1']:.1f}% in {res['train_seconds']:.0f} s "
                f"(study so far {time.perf_counter() - t0:.0f} s)")

    if jobs == 1 or len(todo) <= 1:
        for i, run in todo:
            log(f"[{i}/{len(runs)}] {run.key}: training {run.spec['steps']} steps ...")
            results[i] = trainer_fn(run, run.folder(out), threads=threads)
            log(done_msg(i, run, results[i]))
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            pending = {}
            queue = list(todo)
            try:
                while queue or pending:
                    while queue and len(pending) < jobs:  # submit in plan order, jobs at a time
                        i, run = queue.pop(0)
                        log(f"[{i}/{len(runs)}] {run.key}: training {run.spec['steps']} steps ...")
                        pending[pool.submit(_train_in_worker, trainer_fn, run, run.folder(out), threads)] = (i, run)
                    finished_now, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished_now:
                        i, run = pending.pop(fut)
                        results[i] = fut.result()
                        log(done_msg(i, run, results[i]))
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
    return [results[i] for i in sorted(results)]


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


# ---------------------------------------------------------------------------------- the paper's tables
def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Welch's t-test of two samples (unequal variances): (t, two-sided p).

    NaN where it is undefined: fewer than two values in a sample, or no spread in either."""
    from scipy import stats

    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan")
    (_, sa), (_, sb) = _mean_std(a), _mean_std(b)
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
                mean, sd = _mean_std(acc) if acc else (float("nan"), float("nan"))
                col = task.get("paper_column")
                published = (row.get("paper") or {}).get(col) if col else None
                e = {"table": tid, "variant": row["variant"], "label": row.get("label", row["variant"]),
                     "task": tname, "paper_column": col or "",
                     "paper_top1": float("nan") if published is None else float(published),
                     "seeds": len(rs), "seed_list": " ".join(str(r["seed"]) for r in rs),
                     "steps": rs[0]["steps"] if rs else "", "acc1_mean": mean, "acc1_std": sd,
                     "params": rs[0]["params"] if rs else "", "gflops": rs[0]["gflops"] if rs else "",
                     "train_seconds": _mean_std([r["train_seconds"] for r in rs])[0] if rs else float("nan"),
                     "note": row.get("note", "")}
                for b in baselines:
                    ref = [r["acc1"] for r in sorted(by.get((tname, b), []), key=lambda r: r["seed"])]
                    if row["variant"] == b or not acc or not ref:
                        e[f"delta_{b}"], e[f"p_{b}"] = float("nan"), float("nan")
                    else:
                        e[f"delta_{b}"] = mean - _mean_std(ref)[0]
                        e[f"p_{b}"] = welch(acc, ref)[1]
                out.append(e)
    return out


def _fmt(x: float, spec: str = ".1f", scale: float = 1.0) -> str:
    return "" if x is None or x == "" or (isinstance(x, float) and math.isnan(x)) else format(scale * x, spec)


def write_paper_tables(summary: list[dict], study: dict, out: Path | str, *, command: str = "") -> tuple[Path, Path]:
    """``paper_tables.md`` (one table per paper table: the published top-1 beside ours, mean ± std
    over seeds, and the difference from each baseline with Welch's p) and ``paper_summary.csv``."""
    out = Path(out)
    baselines = list(study.get("baselines") or [])
    blabel = {}
    for task in study["tasks"].values():
        for v in task["variants"]:
            blabel.setdefault(v["name"], v.get("label", v["name"]))
    cols = ["table", "variant", "label", "task", "paper_column", "paper_top1", "seeds", "seed_list", "steps",
            "acc1_mean", "acc1_std"] + [f"{k}_{b}" for b in baselines for k in ("delta", "p")] + \
        ["params", "gflops", "train_seconds", "note"]
    csv_path = out / "paper_summary.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for e in summary:
            w.writerow({k: e.get(k) for k in cols})
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
    md_path = out / "paper_tables.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot_paper(summary: list[dict], rows: list[dict], study: dict, out: Path | str) -> Path:
    """``paper.png``: per task (rows of panels) and paper table (columns), the final top-1 of
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
                m, sd = _mean_std(accs)
                ax.errorbar([k], [m], yerr=[sd], fmt="o", color="C0", capsize=4, zorder=3)
                ax.scatter([k + 0.15] * len(accs), accs, s=8, color="C1", zorder=2)
            if base and by.get((t, base)):  # the baseline's mean (SA), in every panel of the task
                ax.axhline(_mean_std(by[(t, base)])[0], ls="--", color="gray", lw=1)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
            ax.set_xlim(-0.5, len(labels) - 0.5)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(f"{t}\nfinal top-1 (%)")
            if i == 0:
                ax.set_title(textwrap.fill(f"Table {tid}: {table.get('title', '')}", 14 * widths[j]), fontsize=9)
    fig.tight_layout()
    path = out / "paper.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- command line
STUDIES = {"ablation": DEFAULT_CONFIG, "paper": PAPER_CONFIG}


def _parser(name: str = "ablation") -> argparse.ArgumentParser:
    config = STUDIES[name]
    p = argparse.ArgumentParser(prog=f"structvit study {name}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=config, help=f"study file (default {config})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the study's)")
    p.add_argument("--tasks", nargs="+", default=None, help="tasks to run (default: all), e.g. moving_digits")
    p.add_argument("--variants", nargs="+", default=None,
                   help="variants to run by name (in every task) or task/name (default: all)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every run (default: the task's)")
    p.add_argument("--out", default=None,
                   help=f"output folder (default runs/study/{name}, runs/study/{name}_quick with --quick)")
    p.add_argument("--resume", action="store_true", help="keep finished runs in --out and train the rest")
    p.add_argument("--quick", action="store_true",
                   help="the study's smoke plan (its 'quick' block: one seed, a few steps); not a result")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs trained at a time, one process each (default: the study's 'jobs', 1)")
    p.add_argument("--data-root", default=None,
                   help="dataset folder of every selected task (sets data.init_args.root; SSv2/K400 need it)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per run (default: the study's, 1; 0: torch's default)")
    p.add_argument("--plan", action="store_true", help="print the runs and their model sizes, train nothing")
    p.add_argument("--report-only", action="store_true",
                   help="only (re)write the tables and the plot from the finished runs in --out")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: structvit study {ablation,paper} [options]   (`structvit study paper --help` for the options)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    if argv[0] not in STUDIES:
        print(f"structvit study: unknown study {argv[0]!r}; available: {', '.join(STUDIES)}", file=sys.stderr)
        return 2
    name = argv[0]
    parser = _parser(name)
    args = parser.parse_args(argv[1:])
    out = args.out or f"runs/study/{name}{'_quick' if args.quick else ''}"
    try:
        study = load_study(args.config)
        if args.quick:
            study = quick_study(study)
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
            jobs = args.jobs if args.jobs is not None else study.get("jobs", 1)
            t0 = time.perf_counter()
            run_study(runs, out, resume=args.resume, threads=threads, jobs=jobs, log=lambda m: print(m, flush=True))
            print(f"study: {len(runs)} runs in {time.perf_counter() - t0:.0f} s", flush=True)
        res = report(out, runs, command=command, study=study)
    except StudyError as err:
        parser.error(str(err))
    print(res["md"].read_text())
    if "paper_md" in res:
        print(res["paper_md"].read_text())
    print(f"wrote {', '.join(str(res[k]) for k in ('csv', 'md', 'paper_csv', 'paper_md', 'png') if k in res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
