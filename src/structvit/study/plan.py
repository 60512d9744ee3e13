"""A study's plan: the study file (tasks, variants, seeds, the paper's tables) read and checked,
and expanded into the list of runs (:class:`Run`), one per variant and seed.

A *study* is a YAML file (``configs/study/ablation.yaml``, ``configs/study/paper.yaml``): one
or more *tasks* (a data module, a model, a training recipe, a number of steps, an input
shape) and, per task, a list of *variants* that differ only in the model's attention keyword
arguments and, for the one form those cannot express, ``value_patterns: head``
(:func:`structvit.study.variants.tie_value_patterns`).
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

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
        try:
            from ..models import check_model_name

            check_model_name(task["model"], f"task {tname!r}: 'model'")
        except ValueError as err:
            raise StudyError(f"{path}: {err}") from None
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

