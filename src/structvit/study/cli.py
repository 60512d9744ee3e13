"""``structvit study ablation`` and ``structvit study paper``: the paper's ablations as one command each.

A *study* is a YAML file (``configs/study/ablation.yaml``, ``configs/study/paper.yaml``): one
or more *tasks* (a data module, a model, a training recipe, a number of steps, an input
shape) and, per task, a list of *variants* that differ only in the model's attention keyword
arguments (SA: ``struct_blocks: [0, 0]`` or ``attention: sa``; ConvSA: ``attention: convsa``;
StructSA with ``num_patterns`` D, ``window``, ``window_v``, ``patterns``, ``kv_stride`` and
``normalize``) and, for the one form those cannot express, ``value_patterns: head``
(channel-wise correlation with per-head aggregation).  Every variant is trained for every
seed at the same budget (same steps, data, recipe), each in its own folder, one run at a
time or ``jobs`` at a time in separate processes::

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

The documentation's results pages come from the same code: ``--write`` publishes the
finished runs to ``RESULTS_DIR/study_<name>_results.csv`` with the page made from it
(``study_<name>.md``, ``.png``), and ``--report`` rewrites that page from the CSV alone.

Runs are reproducible from their seed on CPU: the seed fixes the initialisation, the
order of the training batches and every random draw of a step (see
``ClassificationModule``); the data itself (the built-in sets) does not depend on it.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

from .page import DEFAULT_RESULTS_DIR, publish, regenerate, results_stem
from .plan import DEFAULT_CONFIG, PAPER_CONFIG, StudyError, expand_plan, load_study, quick_study, variant_D
from .runner import run_study
from .tables import report
from .variants import model_cost

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
    p.add_argument("--write", action="store_true",
                   help="also publish the finished runs of the plan: RESULTS_DIR/NAME_results.csv and the results "
                        "page made from it (NAME.md, NAME.png)")
    p.add_argument("--report", action="store_true",
                   help="train nothing: (re)write the results page RESULTS_DIR/NAME.md (and its figure) from "
                        "RESULTS_DIR/NAME_results.csv alone")
    p.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR,
                   help=f"folder of the results pages and CSVs (default {DEFAULT_RESULTS_DIR})")
    p.add_argument("--results-name", default=None,
                   help=f"file stem of the results (default {results_stem(name)}; another for a re-run of a few "
                        "variants)")
    p.add_argument("--base-results", default=None, metavar="BASE_NAME",
                   help="with --write or --report: variants the results lack are shown from "
                        "RESULTS_DIR/BASE_NAME_results.csv (a re-run of a few variants in its study's tables)")
    return p


def _report_command(name: str, args: argparse.Namespace, stem: str) -> str:
    """The command that regenerates the results page (printed on the page)."""
    parts = ["structvit study", name, "--report"]
    if args.config != STUDIES[name]:
        parts += ["--config", args.config]
    if args.results_dir != DEFAULT_RESULTS_DIR:
        parts += ["--results-dir", args.results_dir]
    if stem != results_stem(name):
        parts += ["--results-name", stem]
    if args.base_results is not None:
        parts += ["--base-results", args.base_results]
    return " ".join(parts)


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
        stem = args.results_name or results_stem(name)
        if args.report:
            written = regenerate(study, args.results_dir, stem, command=_report_command(name, args, stem),
                                 base_stem=args.base_results)
            print(f"wrote {', '.join(str(p) for p in written.values())}")
            return 0
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
        if args.write:
            res.update(publish(res["rows"], study, args.results_dir, stem,
                               command=_report_command(name, args, stem), base_stem=args.base_results))
    except StudyError as err:
        parser.error(str(err))
    print(res["md"].read_text())
    if "paper_md" in res:
        print(res["paper_md"].read_text())
    keys = ("csv", "md", "paper_csv", "paper_md", "png", "results_csv", "summary_csv")
    print(f"wrote {', '.join(str(res[k]) for k in keys if k in res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
