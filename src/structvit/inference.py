"""Classifying files with a trained checkpoint: :class:`Predictor` and :func:`predict`.

The files (video files, frame folders, images) are read and prepared exactly as the test
split was at evaluation: the frame count, sampling, frame stride, test views (clips x
crops), short side, crop size and normalisation come from the checkpoint's metadata
(``preprocessing``, with the class names), which the engine writes into every ``.ckpt``
and ``.safetensors`` it saves; the scores of a sample's views are averaged as in testing.

    from structvit.inference import predict
    rows = predict(["clip.webm"], "best.safetensors", topk=5)
    rows[0]["topk"][0]   # {"index": 3, "name": "Moving something up", "prob": 0.91}

The command ``structvit predict`` (:mod:`structvit.predict`) parses its arguments, calls
:func:`predict` and formats the rows.
"""
from __future__ import annotations

import os
from typing import Sequence

__all__ = ["Predictor", "predict", "load_checkpoint", "parse_views", "PredictError", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class PredictError(ValueError):
    """A bad argument or checkpoint: reported in one line."""


def parse_views(spec) -> tuple[int, int]:
    """``"4x3"`` -> (4 clips, 3 crops); ``"2"`` -> (2, 1)."""
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        clips, crops = spec
    else:
        text = str(spec).lower().strip()
        clips, _, crops = text.partition("x")
        crops = crops or "1"
    try:
        clips, crops = int(clips), int(crops)
    except (TypeError, ValueError):
        raise PredictError(f"--views must be CLIPSxCROPS, e.g. 4x3 or 1x1, got {spec!r}") from None
    if clips < 1 or crops < 1:
        raise PredictError(f"--views needs at least 1 clip and 1 crop, got {spec!r}")
    return clips, crops


def load_checkpoint(path) -> dict:
    """What prediction needs from a ``.safetensors`` export or a Lightning ``.ckpt``
    (read and checked by :func:`structvit.checkpoint.read_checkpoint`):
    ``{"model", "model_kwargs", "num_classes", "classes", "preprocessing", "view_average",
    "state_dict"}``.  Raises :class:`PredictError` naming the file for what is missing or bad."""
    from .checkpoint import CheckpointError, read_checkpoint

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PredictError(f"--checkpoint {path!r}: no such file")
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as err:
        raise PredictError(f"--checkpoint {err}") from None
    if ckpt.format == "state_dict":
        raise PredictError(f"--checkpoint {path}: not a Lightning checkpoint (no state_dict); "
                           "pass the run's .ckpt or .safetensors")
    if not ckpt.model:
        raise PredictError(f"--checkpoint {path}: does not name its model (not written by structvit fit?)")
    if not ckpt.preprocessing:
        raise PredictError(f"--checkpoint {path}: has no preprocessing metadata (input size, frames, views), so "
                           "the files cannot be prepared as at evaluation; use a checkpoint written by "
                           "`structvit fit` (its .ckpt or .safetensors)")
    return {"model": ckpt.model, "model_kwargs": ckpt.model_kwargs, "num_classes": ckpt.num_classes,
            "classes": ckpt.classes, "preprocessing": ckpt.preprocessing, "view_average": ckpt.view_average,
            "state_dict": ckpt.state_dict}


class Predictor:
    """A checkpoint's model and evaluation pipeline, loaded once; :meth:`predict` on paths.

    Args:
        checkpoint: ``.safetensors`` export or ``.ckpt`` of ``structvit fit``.
        views: ``"CLIPSxCROPS"`` (or a pair) instead of the checkpoint's test views (video).
        device: where the model runs.
    """

    def __init__(self, checkpoint, *, views=None, device: str = "cpu"):
        import timm
        import torch

        from . import models as _models  # noqa: F401  (registers the StructViT models)
        from .engine.weights import check_weights

        info = load_checkpoint(checkpoint)
        self.checkpoint = os.fspath(checkpoint)
        self.model_name = info["model"]
        self.preprocessing = dict(info["preprocessing"])
        self.view_average = info["view_average"]
        kwargs = info["model_kwargs"]  # checked by the reader: known options, plain values
        try:
            model = timm.create_model(self.model_name, num_classes=info["num_classes"], **kwargs)
        except Exception as err:  # noqa: BLE001 - unknown model name, bad kwargs
            raise PredictError(f"--checkpoint {checkpoint}: cannot build model {self.model_name!r} "
                               f"({type(err).__name__}: {err})") from None
        sd = check_weights(info["state_dict"], model.state_dict(), self.checkpoint)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as err:
            raise PredictError(f"--checkpoint {checkpoint}: weights do not fit {self.model_name!r} "
                               f"({str(err).splitlines()[0][:200]})") from None
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.num_classes = int(info["num_classes"])
        classes = info["classes"]
        self.classes = [str(c) for c in classes] if classes and len(classes) == self.num_classes else \
            [str(i) for i in range(self.num_classes)]
        self.video = self.preprocessing.get("kind") == "video"
        if views is not None:
            if not self.video:
                raise PredictError("--views applies to video models only (an image is one view)")
            self.preprocessing["num_clips"], self.preprocessing["num_crops"] = parse_views(views)

    # -- reading -------------------------------------------------------------------------
    def _video_dataset(self, paths: list[str]):
        from .data.datasets import UNLABELLED, VideoDataset, VideoRecord
        from .data.sampling import FrameSampler
        from .data.transforms import VideoTransform

        p = self.preprocessing
        sampler = FrameSampler(p["sampling"], num_frames=p["num_frames"], frame_stride=p["frame_stride"],
                               num_clips=p["num_clips"])
        transform = VideoTransform(p["input_size"], train=False, num_crops=p["num_crops"],
                                   test_short_side=p.get("test_short_side"), mean=p["mean"], std=p["std"])
        records = [VideoRecord(path, UNLABELLED, frames=os.path.isdir(path), name=path) for path in paths]
        # the test split's own dataset class: same sampling, decoding and views as at evaluation
        return VideoDataset(records, classes=self.classes, sampler=sampler, transform=transform, train=False,
                            on_unreadable="skip")

    def _image_input(self, path: str):
        import numpy as np
        import torch
        import torch.nn.functional as F
        from .data.images import load_image

        p = self.preprocessing
        img = load_image(path)  # 8-bit RGB with the file's real range (16-bit, float, palette...)
        if p.get("resize") == "crop":
            from .data.transforms import build_image_transform

            tf = build_image_transform(p["input_size"], train=False, mean=p["mean"], std=p["std"])
            return tf(img)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(255)
        s = p["input_size"]
        if tuple(x.shape[-2:]) != (s, s):  # the built-in digits: the whole image at the input size
            x = F.interpolate(x[None], size=(s, s), mode="bilinear", align_corners=False)[0].clamp_(0, 1)
        mean = torch.tensor(p["mean"]).view(3, 1, 1)
        std = torch.tensor(p["std"]).view(3, 1, 1)
        return (x - mean) / std

    def _kind(self, path: str) -> str:
        from .data.datasets import VIDEO_EXTENSIONS

        if os.path.isdir(path):
            return "frames"
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or folder")
        ext = os.path.splitext(path)[1].lower()
        if ext in IMAGE_SUFFIXES:
            return "image"
        if ext in VIDEO_EXTENSIONS:
            return "video"
        raise ValueError(f"{path}: unknown file type {ext!r} (videos: {', '.join(VIDEO_EXTENSIONS)}; images: "
                         f"{', '.join(IMAGE_SUFFIXES)}; or a folder of frames)")

    # -- scoring -------------------------------------------------------------------------
    def scores(self, x):
        """Class probabilities ``(K,)`` of one sample: ``x`` is one view ``(C, [T,] H, W)``
        or ``(V, C, [T,] H, W)`` views, averaged as in testing."""
        import torch

        want = 4 if self.video else 3
        with torch.no_grad():
            views = x.unsqueeze(0) if x.dim() == want else x
            logits = self.model(views.to(self.device)).float()
            if self.view_average == "logits":
                return logits.mean(0).softmax(-1).cpu()
            return logits.softmax(-1).mean(0).cpu()

    def predict(self, paths: Sequence, topk: int = 5) -> list[dict]:
        """One dict per path: ``path``, ``kind`` (video/frames/image), ``views``, ``topk`` (a
        list of ``{"index", "name", "prob"}``, best first) or ``error`` (an unreadable file)."""
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise PredictError(f"--topk must be an int >= 1, got {topk!r}")
        k = min(topk, self.num_classes)
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise PredictError("give at least one video file, frame folder or image")
        rows = []
        for path in paths:
            row = {"path": path, "kind": None, "views": 0, "topk": [], "error": None}
            rows.append(row)
            try:
                row["kind"] = kind = self._kind(path)
            except (FileNotFoundError, ValueError) as err:
                row["error"] = str(err)
                continue
            if (kind == "image") == self.video:
                row["error"] = (f"{path} is an image but {self.model_name} is a video model" if self.video else
                                f"{path} is a {'frame folder' if kind == 'frames' else 'video'} but "
                                f"{self.model_name} is an image model")
                continue
            try:
                if self.video:
                    ds = self._video_dataset([path])
                    item = ds[0]
                    if item is None:
                        row["error"] = f"unreadable: {ds.bad_files[-1] if ds.bad_files else path}"
                        continue
                    x = item[0]
                else:
                    x = self._image_input(path)
            except Exception as err:  # noqa: BLE001 - PIL and friends: name the file
                row["error"] = f"{path}: unreadable ({type(err).__name__}: {err})"
                continue
            prob = self.scores(x)
            row["views"] = 1 if x.dim() == (4 if self.video else 3) else int(x.shape[0])
            top_p, top_i = prob.topk(k)
            row["topk"] = [{"index": int(i), "name": self.classes[int(i)], "prob": float(p)}
                           for p, i in zip(top_p, top_i)]
        return rows


def predict(paths, checkpoint, *, topk: int = 5, views=None, device: str = "cpu") -> list[dict]:
    """Classify ``paths`` (video files, frame folders, images) with ``checkpoint``; see
    :meth:`Predictor.predict` for the result."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return Predictor(checkpoint, views=views, device=device).predict(list(paths), topk=topk)
