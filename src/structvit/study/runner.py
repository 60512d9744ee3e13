"""Training a study's runs: one run (:func:`train_run`, a Lightning fit into the run's folder,
finished by an atomic ``result.json``) and the whole plan (:func:`run_study`), one run at a
time or ``jobs`` at a time in spawned processes, skipping finished runs on ``resume``."""
from __future__ import annotations

import importlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from .plan import RESULT, Run, StudyError, variant_D
from .variants import model_cost, prepare_model, resolved_model_kwargs


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

    from ..engine import ClassificationModule, DeterministicData
    from ..engine.callbacks import export_safetensors

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
    module = ClassificationModule(model=spec["model"], model_kwargs=resolved_model_kwargs(spec), num_classes=num_classes,
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


