"""Reading and writing checkpoints: the one place that opens a weights file.

Formats read by :func:`read_checkpoint`:

* ``.safetensors`` (tensors and string metadata only): the engine's exports and
  ``structvit convert``'s output;
* Lightning ``.ckpt`` (the model under ``state_dict`` with a ``model.`` prefix, its
  ``hyper_parameters`` and the ``structvit`` entry with classes and preprocessing);
* plain PyTorch state dicts and the UniFormer / DeiT release files, which wrap the state
  dict under one of :data:`WRAPPER_KEYS` and may carry a ``module.`` prefix.

Torch files are read with ``torch.load(weights_only=True)``: no pickled object runs code
(``trust=True``, for ``structvit convert --trust-checkpoint`` only, lifts this).

The metadata a checkpoint carries (model name, model options, classes, evaluation
preprocessing) is checked against a schema before anything uses it
(:func:`check_metadata`): the model name must be registered, its options known options
of plain types (no paths, hub ids, pretrained weights or config overlays), and every
preprocessing entry of the expected type and range. A bad entry raises
:class:`CheckpointError` naming the file and the key.

Writers (:func:`atomic_write`, :func:`write_safetensors`, :func:`save_torch`) write into a
temporary file in the destination folder, flush and fsync it, then rename it over the
destination: a kill or a full disk leaves the previous file intact and no partial file
under the checkpoint's name. A failed write raises :class:`CheckpointWriteError` (an
``OSError``) naming the path.

This module needs only torch and safetensors (the core install).
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import errno
import inspect
import io
import json
import math
import os
import pickle
import re
import tempfile
from typing import Any, Iterator, Mapping, Optional

import torch

from .ops.checks import is_int

__all__ = ["WRAPPER_KEYS", "Checkpoint", "CheckpointError", "CheckpointWriteError", "read_checkpoint",
           "unwrap_state_dict", "load_torch", "check_metadata", "check_model_kwargs", "check_preprocessing",
           "loadable_reason", "newest_loadable", "atomic_write", "write_safetensors", "save_torch",
           "PREPROCESSING_SCHEMA", "FORBIDDEN_MODEL_OPTIONS"]

#: keys under which checkpoints wrap their state dict, tried in this order (Lightning,
#: UniFormer video, UniFormer image / DeiT, DataParallel wrappers)
WRAPPER_KEYS = ("state_dict", "model_state", "model", "module")

#: model options a checkpoint may never set: they load weights, files or hub configs
FORBIDDEN_MODEL_OPTIONS = frozenset({
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "pretrained_filter_fn",
    "checkpoint_path", "cache_dir", "features_only", "feature_cfg", "feature_cls", "out_indices",
    "kwargs_filter", "model_cfg", "scriptable", "exportable", "no_jit", "num_classes"})

# metadata keys older ``structvit convert`` files hold model options under (as Python literals)
_LEGACY_OPTION_KEYS = ("struct_blocks", "attention", "num_frames", "class_token")
# a string option value: a name such as "structsa" or "layernorm", never a path, URL or hub id
_SAFE_STRING = re.compile(r"[A-Za-z0-9_.+-]{0,64}")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message starts with the file's path (and names
    the key)."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (disk full, read-only, no permission): the
    message names the path; the previous file under that name is left as it was."""

    def __str__(self) -> str:
        return str(self.strerror)


@dataclasses.dataclass
class Checkpoint:
    """What a checkpoint file holds, checked.

    Attributes:
        path: the file.
        format: ``"safetensors"``, ``"lightning"`` or ``"state_dict"``.
        state_dict: the model's tensors, unwrapped (no ``model.`` / ``module.`` prefix).
        model: the registered model name the file names, or None.
        model_kwargs: the model's options (checked: known names, plain values).
        num_classes: the classifier's outputs, if the file says.
        classes: the class names, if the file has them.
        preprocessing: how inputs were prepared at evaluation (checked), or None.
        view_average: how test views are averaged (``"softmax"`` or ``"logits"``).
        metadata: every other metadata entry (strings of a safetensors file, or the
            Lightning hyper-parameters), unchecked.
    """

    path: str
    format: str
    state_dict: dict[str, torch.Tensor]
    model: Optional[str] = None
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    num_classes: Optional[int] = None
    classes: Optional[list[str]] = None
    preprocessing: Optional[dict] = None
    view_average: str = "softmax"
    metadata: dict = dataclasses.field(default_factory=dict)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


# --------------------------------------------------------------------------- reading


def load_torch(path: str, trust: bool = False, mmap: bool = False):
    """``torch.load`` of ``path`` on the CPU, weights only unless ``trust``; a file that cannot
    be read raises :class:`CheckpointError` starting with its path."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise CheckpointError(f"{path}: cannot be read as weights only: it holds pickled objects that "
                                  "weights-only loading refuses; if you trust the file, convert it with "
                                  "`structvit convert --trust-checkpoint`") from None
        raise CheckpointError(f"{path} is not a readable torch file ({_first_line(err)})") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({_first_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - truncated, not a torch file at all, ...
        raise CheckpointError(f"{path} is not a readable torch file ({_first_line(err)})") from None


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors' own error type, OSError, ...
        raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(err)})") from None
    return sd, meta


def unwrap_state_dict(obj: Mapping, path: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model's tensors inside a loaded checkpoint.

    Descends through at most two of :data:`WRAPPER_KEYS`; from a Lightning state dict takes
    the ``model.`` entries (not ``ema_model.``) without the prefix; strips a ``module.``
    prefix; drops non-tensor entries (step counters and the like).
    """
    if not isinstance(obj, Mapping):
        raise TypeError(f"{path} must be a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    sd, lightning = obj, False
    for _ in range(2):
        key = next((k for k in WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if key is None:
            break
        lightning = lightning or key == "state_dict"
        sd = sd[key]
    if lightning and any(isinstance(k, str) and k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    out = {}
    for name, value in sd.items():
        if isinstance(name, str) and isinstance(value, torch.Tensor):
            out[name.removeprefix("module.")] = value
    if not out:
        raise CheckpointError(f"{path} holds no tensors (expected a state dict or {{'model': state_dict}})")
    return out


def _json(meta: Mapping, key: str, path: str):
    value = meta.get(key)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON ({err})") from None
    return value


def read_checkpoint(path, *, trust: bool = False) -> Checkpoint:
    """Read and check ``path`` (see the module docstring for the formats).

    Args:
        path: the checkpoint file.
        trust: unpickle a torch file fully (``weights_only=False``): only for files the
            user vouches for.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable, holds no tensors, or metadata outside the schema.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        sd, meta = _read_safetensors(path)
        model_kwargs = _json(meta, "model_kwargs", path)
        if model_kwargs is None:  # written by an older `structvit convert`: options as top-level literals
            model_kwargs = {}
            for key in _LEGACY_OPTION_KEYS:
                if key in meta:
                    try:
                        model_kwargs[key] = ast.literal_eval(meta[key])
                    except (ValueError, SyntaxError):
                        model_kwargs[key] = meta[key]
        hparams = _json(meta, "hparams", path) or {}
        num_classes = meta.get("num_classes")
        if num_classes is not None:
            try:
                num_classes = int(num_classes)
            except ValueError:
                raise CheckpointError(f"{path}: metadata 'num_classes' must be an int, got {num_classes!r}") from None
        ckpt = Checkpoint(path, "safetensors", sd, model=meta.get("model") or None, model_kwargs=model_kwargs,
                          num_classes=num_classes, classes=_json(meta, "classes", path),
                          preprocessing=_json(meta, "preprocessing", path),
                          view_average=hparams.get("view_average", "softmax") if isinstance(hparams, dict)
                          else "softmax", metadata=meta)
    else:
        obj = load_torch(path, trust)
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
        sd = unwrap_state_dict(obj, path)
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping) and "hyper_parameters" in obj:
            hp = obj.get("hyper_parameters") or {}
            extra = obj.get("structvit") or {}
            if not isinstance(hp, Mapping) or not isinstance(extra, Mapping):
                raise CheckpointError(f"{path}: 'hyper_parameters' and 'structvit' must be mappings")
            pre = extra.get("preprocessing")
            if pre is None and isinstance(obj.get("datamodule_hyper_parameters"), Mapping):
                pre = _preprocessing_from_datamodule(obj["datamodule_hyper_parameters"])
            ckpt = Checkpoint(path, "lightning", sd, model=hp.get("model") or None,
                              model_kwargs=hp.get("model_kwargs") or {}, num_classes=hp.get("num_classes"),
                              classes=extra.get("classes"), preprocessing=pre,
                              view_average=hp.get("view_average", "softmax"), metadata=dict(hp))
        else:
            ckpt = Checkpoint(path, "state_dict", sd)
    check_metadata(ckpt)
    if ckpt.num_classes is None:
        head = next((v for k, v in sd.items() if k.endswith("head.weight") and v.dim() == 2), None)
        ckpt.num_classes = int(head.shape[0]) if head is not None else None
    return ckpt


def _preprocessing_from_datamodule(hp: Mapping) -> Optional[dict]:
    """The evaluation pipeline of a Lightning checkpoint's data module hyper-parameters
    (checkpoints written before the engine stored ``preprocessing``)."""
    from .data.datamodule import build_datamodule

    # only plain settings: nothing that names a file or folder to open
    hp = {k: v for k, v in hp.items() if k not in ("root", "reader_options", "moving_digits_options") and _plain(v)}
    dataset = hp.pop("dataset", None)
    if not isinstance(dataset, str):
        return None
    try:
        dm = build_datamodule(dataset, **hp)
    except (TypeError, ValueError, OSError):
        return None
    return dm.eval_preprocessing() if hasattr(dm, "eval_preprocessing") else None


# --------------------------------------------------------------------------- schema


def _plain(value, depth: int = 0) -> bool:
    """A value a model option may take from a file: None, bool, int, finite float, a short
    name-like string, or a short list/tuple of those."""
    if value is None or isinstance(value, (bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return bool(_SAFE_STRING.fullmatch(value)) and ".." not in value
    if isinstance(value, (list, tuple)) and depth < 2 and len(value) <= 64:
        return all(_plain(v, depth + 1) for v in value)
    return False


def _model_options(model: str) -> Optional[frozenset[str]]:
    """The constructor options of a project model, None for another timm model."""
    from . import models

    cls = {**{n: models.StructViT for n in models.MODEL_NAMES + tuple(models.DENSE_MODELS)},
           **{n: models.StructDeiT for n in models.DEIT_MODEL_NAMES}}.get(model)
    if cls is None:
        return None
    params = inspect.signature(cls.__init__).parameters.values()
    return frozenset(p.name for p in params if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                               p.KEYWORD_ONLY))


def check_model_kwargs(model: str, kwargs, where: str = "model_kwargs") -> dict:
    """``kwargs`` if they are known options of ``model`` with plain values, else
    ``ValueError`` naming ``where`` and the option. Lists become tuples."""
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{where} must be a mapping of option names to values, got {type(kwargs).__name__}")
    known = _model_options(model)
    out = {}
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"{where}: option names must be identifiers, got {key!r}")
        if key in FORBIDDEN_MODEL_OPTIONS or (known is not None and key not in known):
            raise ValueError(f"{where}: {key!r} is not an option of {model} that a checkpoint may set")
        if not _plain(value):
            raise ValueError(f"{where}: {key}={value!r} is not a plain value (numbers, names, lists of them; "
                             "no paths or URLs)")
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _int_in(lo: int, hi: int):
    def check(v):
        return is_int(v) and lo <= v <= hi
    check.expected = f"an int in [{lo}, {hi}]"
    return check


def _one_of(*choices):
    def check(v):
        return v in choices
    check.expected = f"one of {choices}"
    return check


def _floats(n_min: int, n_max: int, positive: bool = False):
    def check(v):
        return (isinstance(v, (list, tuple)) and n_min <= len(v) <= n_max
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                        and (x > 0 or not positive) for x in v))
    check.expected = f"{n_min}-{n_max} finite{' positive' if positive else ''} numbers"
    return check


def _float_in(lo: float, hi: float):
    def check(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and lo < v <= hi
    check.expected = f"a number in ({lo}, {hi}]"
    return check


def _name(v) -> bool:
    return isinstance(v, str) and bool(_SAFE_STRING.fullmatch(v)) and ".." not in v


_name.expected = "a short name (letters, digits, _ . + -)"

#: the entries of ``preprocessing`` and what each must be; an entry not listed is refused.
#: Dense-prediction tasks add their own entries here.
PREPROCESSING_SCHEMA: dict[str, Any] = {
    "kind": _one_of("image", "video", "detection", "segmentation"),
    "dataset": _name,
    "input_size": _int_in(1, 8192),
    "mean": _floats(1, 4),
    "std": _floats(1, 4, positive=True),
    "resize": _one_of("full", "crop"),
    "interpolation": _one_of("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"),
    "crop_pct": _float_in(0.0, 1.0),
    "test_short_side": _int_in(1, 8192),
    "num_frames": _int_in(1, 4096),
    "sampling": _one_of("dense", "segment"),
    "frame_stride": _int_in(1, 1024),
    "num_clips": _int_in(1, 64),
    "num_crops": _int_in(1, 16),
}
# what a kind of preprocessing cannot do without
_PREPROCESSING_REQUIRED = {"image": ("input_size", "mean", "std"),
                           "video": ("input_size", "mean", "std", "num_frames", "sampling", "frame_stride",
                                     "num_clips", "num_crops")}


def check_preprocessing(pre, where: str = "preprocessing") -> dict:
    """``pre`` if every entry is in :data:`PREPROCESSING_SCHEMA` and valid, else ``ValueError``
    naming ``where`` and the entry."""
    if not isinstance(pre, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(pre).__name__}")
    for key, value in pre.items():
        check = PREPROCESSING_SCHEMA.get(key)
        if check is None:
            raise ValueError(f"{where}: unknown entry {key!r} (known: {', '.join(PREPROCESSING_SCHEMA)})")
        if not check(value):
            raise ValueError(f"{where}: {key!r} must be {check.expected}, got {value!r}")
    missing = [k for k in _PREPROCESSING_REQUIRED.get(pre.get("kind"), ()) if k not in pre]
    if "kind" not in pre or missing:
        raise ValueError(f"{where}: missing {', '.join(missing) if missing else 'kind'}")
    return dict(pre)


def check_metadata(ckpt: Checkpoint) -> Checkpoint:
    """Check ``ckpt``'s model name, options, classes and preprocessing (in place); a bad
    entry raises :class:`CheckpointError` naming the file and the key."""
    from .models import check_model_name

    path = ckpt.path
    try:
        if ckpt.model is not None:
            ckpt.model = check_model_name(ckpt.model, "metadata 'model'")
            ckpt.model_kwargs = check_model_kwargs(ckpt.model, ckpt.model_kwargs, "metadata 'model_kwargs'")
        elif ckpt.model_kwargs:
            raise ValueError("metadata 'model_kwargs' without 'model'")
        if ckpt.num_classes is not None and not _int_in(1, 10**7)(ckpt.num_classes):
            raise ValueError(f"metadata 'num_classes' must be a positive int, got {ckpt.num_classes!r}")
        if ckpt.classes is not None:
            if not isinstance(ckpt.classes, (list, tuple)) or not all(isinstance(c, (str, int)) for c in ckpt.classes):
                raise ValueError("metadata 'classes' must be a list of names")
            ckpt.classes = [str(c) for c in ckpt.classes]
        if ckpt.preprocessing is not None:
            ckpt.preprocessing = check_preprocessing(ckpt.preprocessing, "metadata 'preprocessing'")
        if ckpt.view_average not in ("softmax", "logits"):
            raise ValueError(f"metadata 'view_average' must be 'softmax' or 'logits', got {ckpt.view_average!r}")
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return ckpt


# --------------------------------------------------------------------------- loadability


def loadable_reason(path, weights_only: bool = True) -> Optional[str]:
    """None if the torch file ``path`` loads (as Lightning will load it), else the reason in
    one line. Tensors are memory-mapped, not read: this catches truncated files and broken
    or refused pickles cheaply."""
    try:
        torch.load(os.fspath(path), map_location="cpu", weights_only=weights_only, mmap=True)
    except Exception as err:  # noqa: BLE001 - every way a file can be unreadable
        return _first_line(err)
    return None


def newest_loadable(folder, exclude=None, weights_only: bool = True) -> Optional[str]:
    """The newest readable ``.ckpt`` of ``folder`` other than ``exclude``: step and last
    checkpoints first (they continue a run), ``best`` ones last."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return None
    others = []
    for name in os.listdir(folder):
        p = os.path.join(folder, name)
        if name.endswith(".ckpt") and os.path.isfile(p) and not (exclude and os.path.exists(exclude)
                                                                 and os.path.samefile(p, exclude)):
            others.append(p)
    others.sort(key=lambda p: (os.path.basename(p).startswith("best"), -os.path.getmtime(p)))
    return next((p for p in others if loadable_reason(p, weights_only) is None), None)


# --------------------------------------------------------------------------- writing


def _write_error(path: str, err: OSError) -> CheckpointWriteError:
    reason = err.strerror or (os.strerror(err.errno) if err.errno else _first_line(err))
    return CheckpointWriteError(err.errno or errno.EIO, f"cannot write {path}: {reason} (the previous file, "
                                                        "if any, is left as it was)")


def _remove_stale_temporaries(path: str) -> None:
    """Temporary files of ``path`` left by a writer that was killed before its rename."""
    folder, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}."
    for other in os.listdir(folder):
        if other.startswith(prefix) and other.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, other))


@contextlib.contextmanager
def atomic_write(path) -> Iterator[str]:
    """Yield a temporary path in ``path``'s folder (``.NAME.XXXX.tmp``); when the block ends,
    the file written there is fsynced and renamed to ``path`` (and the folder fsynced), and
    temporaries of ``path`` left by a killed writer are removed. On any error the temporary
    file is removed and ``path`` is untouched; an ``OSError`` (disk full,
    read-only folder, no permission) becomes :class:`CheckpointWriteError` naming ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _remove_stale_temporaries(path)
        with contextlib.suppress(OSError):  # not every platform can fsync a folder
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except CheckpointWriteError:
        raise
    except OSError as err:
        raise _write_error(path, err) from err
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def write_safetensors(path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``state_dict`` as safetensors (contiguous CPU copies; shared storage cloned)
    with ``metadata`` (values as strings), atomically (see :func:`atomic_write`)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    path = os.fspath(path)
    with atomic_write(path) as tmp:
        try:
            save_file(tensors, tmp, metadata=meta)
        except OSError:
            raise
        except Exception as err:  # noqa: BLE001 - safetensors reports I/O failures as its own error
            raise OSError(errno.EIO, _first_line(err)) from err


def save_torch(obj: Any, path) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`atomic_write`).

    The file is serialised in memory first: torch's writer reports a full disk as a
    ``RuntimeError`` about stream positions, a plain ``write`` as ``OSError(ENOSPC)``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
