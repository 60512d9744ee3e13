"""The ``structvit`` command.

Each sub-command lives in its own module with a ``main(argv)`` entry point (or a named
function, ``"module:function"``) and is imported only when called, so ``structvit --help`` stays fast.
This module imports nothing from the package at module level: the console entry point
(:mod:`structvit_cli`) runs it without importing ``structvit`` (whose ``__init__`` registers
the models with timm, importing torch), so ``--help`` and ``--version`` answer without torch.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), one-line help)
COMMANDS = {
    "demo": ("structvit.demo", "run the built-in demo on built-in data (no download)"),
    "bench": ("structvit.bench", "benchmarks: `structvit bench op` (StructSA backends vs SA)"),
    "convert": ("structvit.convert", "convert a UniFormer/SA checkpoint to a StructViT safetensors file"),
    "models": ("structvit.models.summary", "list registered models with parameters and GFLOPs"),
    "data": ("structvit.data.check", "dataset tools: `structvit data check --dataset NAME --root DIR`"),
    "viz": ("structvit.viz.cli", "figures: `structvit viz attention|kernels|compare ...`"),
    "segment-scenes": ("structvit.segment_scenes", "Semantic FPN on the built-in digit scenes, StructSA vs SA (CPU scale)"),
    "report": ("structvit.report", "parameters, GFLOPs, activation memory and throughput of a model"),
    "fit": ("structvit.engine.cli:fit", "train: `structvit fit --config configs/digits_structvit_tiny.yaml`"),
    "validate": ("structvit.engine.cli:validate", "evaluate on the validation split (`--ckpt_path best|last|FILE`)"),
    "test": ("structvit.engine.cli:test", "test, multi-view for video (`--ckpt_path best|last|FILE`)"),
    "predict": ("structvit.predict", "classify files: `structvit predict PATH... --checkpoint CKPT` (or a split: --config)"),
    "study": ("structvit.study", "the ablations: `structvit study ablation` (StructViT), `structvit study paper [--quick]` (Tables 1, 6a)"),
}


# Top-level module of an optional dependency -> the extra that installs it (pyproject.toml).
EXTRAS = {
    "lightning": "train",
    "lightning_fabric": "train",
    "lightning_utilities": "train",
    "pytorch_lightning": "train",
    "jsonargparse": "train",
    "docstring_parser": "train",
    "typeshed_client": "train",
    "torchmetrics": "train",
    "tensorboard": "train",
    "sklearn": "train",
    "yaml": "train",
    "PIL": "train",
    "av": "video",
    "matplotlib": "viz",
    "pycocotools": "detection",
}
EXTRA_NAMES = {"train": "training", "video": "video", "viz": "visualisation", "detection": "detection"}


def missing_extra(error: ModuleNotFoundError) -> str | None:
    """The extra that provides the module ``error`` reports missing, or None if it is not an optional dependency."""
    name = (error.name or "").partition(".")[0]
    return EXTRAS.get(name)


def _version() -> str:
    """The installed distribution's version (no package import: ``structvit.__version__`` would import torch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("structvit")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from structvit import __version__

        return __version__


def _usage() -> str:
    lines = ["usage: structvit COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`structvit COMMAND --help` shows the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(_version())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"structvit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _, func = COMMANDS[name][0].partition(":")  # "module" (its main) or "module:function"
    try:
        module = importlib.import_module(target)
        return int(getattr(module, func or "main")(rest) or 0)
    except OSError as e:  # disk full, read-only folder, no permission: one line naming the path
        from structvit import config

        if config.settings().traceback:
            raise
        where = f"{e.strerror or type(e).__name__}: {e.filename}" if e.filename is not None else str(e)
        print(f"structvit {name}: error: {where} (STRUCTVIT_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        # An optional dependency, imported by the command's module or later while it runs.
        extra = missing_extra(e)
        if extra is None:
            raise
        print(f"structvit {name} needs the {EXTRA_NAMES[extra]} extra (module {e.name!r} is not installed): "
              f'pip install "structvit[{extra}]"', file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
