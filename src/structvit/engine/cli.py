"""``structvit fit|validate|test|predict``: LightningCLI over :class:`ClassificationModule`
and the StructViT data modules.

Usage::

    structvit fit --config configs/digits_structvit_tiny.yaml
    structvit fit --config configs/ssv2_structvit_s_4_1.yaml --data.root /data/ssv2 \\
        --model.model structvit_tiny_video --trainer.max_steps 2
    structvit fit --config configs/digits_structvit_tiny.yaml --ckpt_path last      # resume
    structvit test --config configs/digits_structvit_tiny.yaml --ckpt_path best

A run writes into ``trainer.default_root_dir`` (default ``runs/default``):
``checkpoints/`` (Lightning's ``last.ckpt``/``best.ckpt``, the newest
:data:`STEP_CHECKPOINTS_KEPT` ``step<N>.ckpt`` and their ``.safetensors`` exports)
and ``logs/version_N/`` (TensorBoard events, ``metrics.csv``, the resolved ``config.yaml``).
Errors in the input (unknown model, dataset or config key, empty dataset root, a checkpoint
of another model, a corrupt or truncated checkpoint, named with the newest readable one to
resume from instead) end with a one-line message; set
``STRUCTVIT_TRACEBACK=1`` for the full traceback.
"""
from __future__ import annotations

import csv
import os
import sys
import warnings
from typing import Optional

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from .callbacks import DeterministicData, StructViTCheckpoint, Throughput
from .module import ClassificationModule, NonFiniteLossError

__all__ = ["StructViTCLI", "main", "SUBCOMMANDS", "default_loggers", "write_predictions"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: step checkpoints (``step<N>.ckpt``) kept by default besides ``last.ckpt`` and ``best.ckpt``
STEP_CHECKPOINTS_KEPT = 3


class CLIError(Exception):
    """A bad command line or config: reported in one line."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: reported in one line naming it (and the one to use instead)."""


class _Parser(LightningArgumentParser):
    """Parse errors as one line (``STRUCTVIT_TRACEBACK=1`` or ``JSONARGPARSE_DEBUG=1``: the usual output)."""

    def error(self, message: str, ex: Optional[Exception] = None):  # noqa: D401
        if os.environ.get("STRUCTVIT_TRACEBACK") or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)
        raise CLIError(_concise(message))


def _reason(message: str) -> str:
    """The informative line of a (possibly nested, multi-line) jsonargparse/constructor error."""
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    reasons = [ln[2:].strip() for ln in lines if ln.startswith("- ")
               and "NoneType" not in ln and not ln.startswith("- Expected a <class")]
    return reasons[0] if reasons else lines[0]


def _concise(message: str) -> str:
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
    if not lines:
        return "invalid arguments"
    if any(ln.startswith("- ") for ln in lines):
        return _reason(message)
    # jsonargparse nests the reasons; the most specific line usually names the key
    keyed = [ln for ln in lines if "Key \"" in ln or "key \"" in ln or "Unrecognized" in ln or "not expected" in ln
             or "does not exist" in ln or "No action" in ln]
    head = keyed[0] if keyed else lines[0]
    if head != lines[0] and len(lines[0]) < 120:
        head = f"{lines[0].rstrip(':')}: {head}" if not head.startswith(lines[0]) else head
    return head if len(head) < 400 else head[:400] + " ..."


def default_loggers(root: str) -> list:
    """TensorBoard and CSV loggers writing into the same ``<root>/logs/version_N`` folder."""
    import warnings

    # the CSV logger warns about the folder the TensorBoard logger has just made; it only
    # (re)writes its own metrics.csv / hparams.yaml there
    warnings.filterwarnings("ignore", ".*Experiment logs directory .* exists and is not empty.*")
    tb = TensorBoardLogger(root, name="logs", default_hp_metric=False)
    return [tb, CSVLogger(root, name="logs", version=tb.version)]


class StructViTCLI(LightningCLI):
    """LightningCLI with the StructViT defaults (see the module docstring)."""

    def __init__(self, args=None, run: bool = True, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("trainer_defaults", {"callbacks": [DeterministicData(), Throughput()],
                                               "default_root_dir": "runs/default", "log_every_n_steps": 10})
        # any LightningModule by class_path (detection, segmentation); a config without one is classification
        super().__init__(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         parser_class=_Parser, auto_configure_optimizers=False, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(StructViTCheckpoint, "checkpoint")
        # step checkpoints: the newest STEP_CHECKPOINTS_KEPT (ranked by step), plus last.ckpt
        parser.set_defaults({"checkpoint.filename": "step{step}", "checkpoint.save_last": True,
                             "checkpoint.monitor": "step", "checkpoint.mode": "max",
                             "checkpoint.save_top_k": STEP_CHECKPOINTS_KEPT, "checkpoint.every_n_train_steps": 100,
                             "checkpoint.auto_insert_metric_name": False})
        parser.add_lightning_class_args(StructViTCheckpoint, "best_checkpoint")
        parser.set_defaults({"best_checkpoint.filename": "best", "best_checkpoint.monitor": "val/acc1",
                             "best_checkpoint.mode": "max", "best_checkpoint.save_top_k": 1,
                             "best_checkpoint.auto_insert_metric_name": False})
        parser.set_defaults({"data": {"class_path": "structvit.data.ImageDataModule",
                                      "init_args": {"dataset": "digits"}}})
        parser.set_defaults({"model": {"class_path": f"{ClassificationModule.__module__}.ClassificationModule"}})
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "weights_only" in self._subcommand_method_arguments.get(subcommand, []):
            parser.set_defaults(weights_only=True)  # never unpickle arbitrary objects from a checkpoint
        return parser

    def instantiate_trainer(self, **kwargs):
        cfg = self._get(self.config_init, "trainer", default={})
        if cfg.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(cfg.get("default_root_dir") or "runs/default")
        return super().instantiate_trainer(**kwargs)

    def _resolve_ckpt_path(self, subcommand: str) -> None:
        """``best``/``last`` name the files of this run's checkpoint folder (also in a new process);
        the checkpoint is then checked to be readable (see :func:`check_checkpoint`)."""
        cfg = self.config_init[subcommand]
        path = cfg.get("ckpt_path")
        weights_only = cfg.get("weights_only", True) is not False
        if path not in ("best", "last"):
            if path is not None:
                if not os.path.exists(str(path)):
                    raise FileNotFoundError(f"checkpoint not found: {path}")
                check_checkpoint(str(path), weights_only)
            return
        folders = [cb.dirpath for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        folders.append(os.path.join(self.trainer.default_root_dir, "checkpoints"))
        for folder in folders:
            if not os.path.isdir(folder):
                continue
            found = sorted((os.path.join(folder, f) for f in os.listdir(folder)
                            if f.endswith(".ckpt") and (f == "best.ckpt" or f.startswith("best-v") if path == "best"
                                                        else f.startswith("last"))), key=os.path.getmtime)
            if found:
                cfg["ckpt_path"] = found[-1]
                check_checkpoint(found[-1], weights_only)
                return
        if subcommand == "fit" and path == "last":  # nothing to resume: start from scratch
            print(f"structvit fit: no last checkpoint under {folders[-1]}; starting from scratch", file=sys.stderr)
            cfg["ckpt_path"] = None
            return
        raise FileNotFoundError(f"no {path!r} checkpoint under {', '.join(dict.fromkeys(folders))}")

    def _run_subcommand(self, subcommand: str) -> None:
        self._resolve_ckpt_path(subcommand)
        try:
            cfg = self.config[subcommand]
            self.model.run_config = self._parser(subcommand).dump(cfg, skip_none=False, skip_check=True)
        except Exception:  # noqa: BLE001 - the config in the metadata is a convenience
            self.model.run_config = None
        super()._run_subcommand(subcommand)

    def predict(self, **kwargs) -> None:
        kwargs["return_predictions"] = True
        self.predictions = self.trainer.predict(**kwargs)
        trainer = self.trainer
        out_dir = trainer.log_dir or trainer.default_root_dir
        os.makedirs(out_dir, exist_ok=True)
        name = "predictions.csv" if trainer.world_size == 1 else f"predictions_rank{trainer.global_rank}.csv"
        path = os.path.join(out_dir, name)
        n, skipped = write_predictions(path, self.predictions or [], self.datamodule)
        print(f"predictions of {n} samples written to {path}"
              + (f" ({skipped} unreadable samples skipped)" if skipped else ""))


def write_predictions(path: str, batches, datamodule=None) -> tuple[int, int]:
    """``predictions.csv``: one row per sample with its dataset position, id (file or video
    id), predicted class and name, top-k classes, names and probabilities, and the target
    (and its name) where the data has labels.  Returns ``(rows, skipped samples)``."""
    ids, classes = None, None
    if datamodule is not None:
        try:
            ids = datamodule.sample_ids("test") if hasattr(datamodule, "sample_ids") else None
        except Exception:  # noqa: BLE001 - ids are a convenience
            ids = None
        classes = list(getattr(datamodule, "classes", None) or []) or None

    def cname(i: int) -> str:
        return classes[i] if classes is not None and 0 <= i < len(classes) else ""

    rows, skipped, position = 0, 0, 0
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "id", "pred", "pred_name", "topk", "topk_names", "topk_prob", "target", "target_name"])
        for batch in batches:
            if batch is None:
                continue
            skipped += int(batch.get("skipped", 0))
            if "pred" not in batch:
                continue
            index = batch.get("index")
            for j in range(len(batch["pred"])):
                i = int(index[j]) if index is not None else position
                position += 1
                top = [int(v) for v in batch["topk"][j]]
                target = int(batch["target"][j]) if "target" in batch else -1
                w.writerow([i, ids[i] if ids is not None and i < len(ids) else "", top[0], cname(top[0]),
                            " ".join(map(str, top)), "|".join(cname(t) for t in top),
                            " ".join(f"{float(v):.4f}" for v in batch["topk_prob"][j]),
                            target if target >= 0 else "", cname(target) if target >= 0 else ""])
                rows += 1
    return rows, skipped


def _readable(path: str, weights_only: bool = True) -> Optional[str]:
    """None if ``path`` loads as Lightning will load it, else the reason (one line). The
    tensors are memory-mapped, not read: this catches truncated files and broken pickles."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except Exception as err:  # noqa: BLE001 - every way a file can be unreadable
        text = str(err).strip().splitlines()
        return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__
    return None


def check_checkpoint(path: str, weights_only: bool = True) -> None:
    """Raise :class:`CheckpointError` if ``path`` cannot be loaded, naming it and the newest
    readable checkpoint of the same folder to continue from instead."""
    reason = _readable(path, weights_only)
    if reason is None:
        return
    if weights_only and "weights only" in reason.lower() and "Unpickl" in reason:
        raise CheckpointError(f"checkpoint {path} holds objects that weights_only loading refuses ({reason}); "
                              "if you trust the file, pass --weights_only false")
    folder = os.path.dirname(os.path.abspath(path))
    others = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".ckpt")
              and not os.path.samefile(os.path.join(folder, f), path)]
    # step and last checkpoints first (they continue the run), newest first; best.ckpt last
    others.sort(key=lambda p: (os.path.basename(p).startswith("best"), -os.path.getmtime(p)))
    previous = next((p for p in others if _readable(p, weights_only) is None), None)
    hint = (f"; continue from the previous one with --ckpt_path {previous}" if previous
            else f"; no other readable checkpoint in {folder}: start again without --ckpt_path")
    raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({reason}){hint}")


def main(argv: Optional[list[str]] = None, subcommand: Optional[str] = None) -> int:
    """``structvit SUBCOMMAND ...`` (``subcommand`` given) or ``python -m structvit.engine.cli SUBCOMMAND ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ([subcommand] if subcommand else []) + argv
    name = f"structvit {args[0]}" if args and args[0] in SUBCOMMANDS else "structvit"
    try:
        with warnings.catch_warnings():
            # we pass the command line as `args` on purpose; Lightning warns when sys.argv is set too
            warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python.*")
            StructViTCLI(args=args)
    except CLIError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"{name}: error: {err}; training stopped, checkpoints are those saved before this step "
              "(resume with --ckpt_path last, or set --model.nonfinite_loss skip)", file=sys.stderr)
        return 1
    except (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, ImportError) as err:
        if os.environ.get("STRUCTVIT_TRACEBACK"):
            raise
        msg = _reason(str(err)) or type(err).__name__
        if isinstance(err, KeyError):
            msg = msg.strip("'\"")
        print(f"{name}: error: {msg} (STRUCTVIT_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


def fit(argv=None) -> int:
    return main(argv, "fit")


def validate(argv=None) -> int:
    return main(argv, "validate")


def test(argv=None) -> int:
    return main(argv, "test")


def predict(argv=None) -> int:
    """``structvit predict``: files (``PATH ... --checkpoint CKPT``, :mod:`structvit.predict`)
    or a data module's test split (``--config ...``, LightningCLI)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from ..predict import is_file_predict, main as predict_files

    if is_file_predict(argv):
        return predict_files(argv)
    return main(argv, "predict")


if __name__ == "__main__":
    sys.exit(main())
