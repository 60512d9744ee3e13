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
of another model, a corrupt, truncated or hostile checkpoint, named with the newest readable
one to resume from instead) and disk-full, read-only or permission errors end with a
one-line message naming the file; ``STRUCTVIT_TRACEBACK=1`` (or
``structvit.config.set_traceback(True)``) shows the full traceback.

Every checkpoint Lightning writes goes through :class:`~structvit.engine.callbacks.AtomicCheckpointIO`
(a temporary file in the checkpoint folder, fsynced, then renamed), so a kill or a full
disk never leaves a partial file under a checkpoint's name.
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

from .. import config
from ..checkpoint import CheckpointError, check_model_kwargs, load_torch, loadable_reason, newest_loadable
from ..models import check_model_name
from .callbacks import DeterministicData, StructViTCheckpoint, Throughput
from .module import ClassificationModule, NonFiniteLossError

__all__ = ["StructViTCLI", "main", "SUBCOMMANDS", "default_loggers", "write_predictions", "check_checkpoint",
           "checked_hyper_parameters", "CheckpointError"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: step checkpoints (``step<N>.ckpt``) kept by default besides ``last.ckpt`` and ``best.ckpt``
STEP_CHECKPOINTS_KEPT = 3


class CLIError(Exception):
    """A bad command line or config: reported in one line."""


class _Parser(LightningArgumentParser):
    """Parse errors as one line (``STRUCTVIT_TRACEBACK=1`` or ``JSONARGPARSE_DEBUG=1``: the usual output)."""

    def error(self, message: str, ex: Optional[Exception] = None):  # noqa: D401
        if config.settings().traceback or os.environ.get("JSONARGPARSE_DEBUG"):
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

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's reading of ``--ckpt_path FILE``'s hyper-parameters into the config,
        done by the project: the file is checked first (readable; the model name and options
        it records within the schema of :mod:`structvit.checkpoint`), and the ``pretrained*``
        entries, which name a file to load, are left out (resumed weights come from the
        checkpoint itself)."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path in (None, "best", "last"):
            return
        path = str(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        weights_only = self.config[subcommand].get("weights_only", True) is not False
        check_checkpoint(path, weights_only)
        hparams = checked_hyper_parameters(path, weights_only)
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

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
        if hasattr(self.model, "write_predictions"):  # dense models write their own format (COCO results, PNGs)
            print(self.model.write_predictions(out_dir, self.predictions or [], trainer.global_rank, trainer.world_size))
            return
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


def check_checkpoint(path: str, weights_only: bool = True) -> None:
    """Raise :class:`~structvit.checkpoint.CheckpointError` if ``path`` cannot be loaded,
    naming it and the newest readable checkpoint of the same folder to continue from instead."""
    reason = loadable_reason(path, weights_only)
    if reason is None:
        return
    if weights_only and "weights only" in reason.lower() and "Unpickl" in reason:
        raise CheckpointError(f"checkpoint {path} holds objects that weights_only loading refuses ({reason}); "
                              "if you trust the file, pass --weights_only false")
    folder = os.path.dirname(os.path.abspath(path))
    previous = newest_loadable(folder, exclude=path, weights_only=weights_only)
    hint = (f"; continue from the previous one with --ckpt_path {previous}" if previous
            else f"; no other readable checkpoint in {folder}: start again without --ckpt_path")
    raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({reason}){hint}")


def checked_hyper_parameters(path: str, weights_only: bool = True) -> dict:
    """The hyper-parameters a Lightning checkpoint records, checked before they reach the
    config (and so ``timm.create_model``): a registered model name, known model options of
    plain values; ``pretrained*`` (a file to load) dropped. A bad entry raises
    :class:`~structvit.checkpoint.CheckpointError` naming the file and the key."""
    ckpt = load_torch(path, trust=not weights_only, mmap=True)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if hp is None:
        return {}
    try:
        if not isinstance(hp, dict):
            raise ValueError("'hyper_parameters' must be a mapping")
        if hp.get("model") is not None:
            check_model_name(hp["model"], "'hyper_parameters.model'")
            check_model_kwargs(hp["model"], hp.get("model_kwargs") or {}, "'hyper_parameters.model_kwargs'")
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    return {k: v for k, v in hp.items() if not str(k).startswith("pretrained")}


def _os_error_line(err: OSError) -> str:
    """One line for a failed file operation, naming the path."""
    if err.filename is not None:
        return f"{err.strerror or type(err).__name__}: {err.filename}"
    return str(err)


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
        if config.settings().traceback:
            raise
        msg = _reason(str(err)) or type(err).__name__
        if isinstance(err, KeyError):
            msg = msg.strip("'\"")
        print(f"{name}: error: {msg} (STRUCTVIT_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1
    except OSError as err:  # disk full, read-only folder, no permission
        if config.settings().traceback:
            raise
        print(f"{name}: error: {_os_error_line(err)} (STRUCTVIT_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1
    return 0


def fit(argv=None) -> int:
    return main(argv, "fit")


def validate(argv=None) -> int:
    return main(argv, "validate")


def test(argv=None) -> int:
    return main(argv, "test")


if __name__ == "__main__":
    sys.exit(main())
