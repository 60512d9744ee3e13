"""Reading frames: video files with PyAV (seeking to the wanted frames) and JPEG frame folders.

All readers return a ``uint8`` tensor of shape ``(N, H, W, 3)`` holding the requested
frames in the requested order (indices may repeat and need not be sorted).  Problems
with a file raise :class:`DataFileError` (a subclass of ``RuntimeError``) carrying the
file's path, so a dataset can report, count and replace the sample.  A stream whose
frame size changes mid-way (or a frame folder of mixed sizes) gives frames scaled to the
size of the first frame read, as mmaction2's decoders do.
"""
from __future__ import annotations

import os
import re
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch

from .files import CorruptFileError, DataFileError, MissingFileError, PathGuard, inside_root

__all__ = [
    "DataFileError",
    "MissingFileError",
    "CorruptFileError",
    "VideoInfo",
    "probe_video",
    "read_video_frames",
    "read_video_all",
    "count_decodable_frames",
    "list_frame_files",
    "read_frame_folder",
    "IMAGE_EXTENSIONS",
    "write_video",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class VideoInfo:
    """Basic facts about a video stream (from its header, nothing decoded)."""

    __slots__ = ("num_frames", "fps", "width", "height", "codec", "exact")

    def __init__(self, num_frames, fps, width, height, codec, exact):
        self.num_frames = num_frames
        self.fps = fps
        self.width = width
        self.height = height
        self.codec = codec
        self.exact = exact  # True when the container states the frame count

    def __repr__(self):
        return (f"VideoInfo(num_frames={self.num_frames}, fps={float(self.fps):.3f}, "
                f"size={self.width}x{self.height}, codec={self.codec!r}, exact={self.exact})")


def _open(path):
    import av

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(path, "file not found")
    try:
        container = av.open(path, metadata_errors="ignore")
    except Exception as e:  # av.error.InvalidDataError and friends
        raise CorruptFileError(path, f"cannot open video ({type(e).__name__}: {e})") from None
    if not container.streams.video:
        container.close()
        raise CorruptFileError(path, "no video stream")
    return container


def _info(container, path) -> VideoInfo:
    stream = container.streams.video[0]
    fps = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not fps:
        raise CorruptFileError(path, "unknown frame rate")
    fps = Fraction(fps)
    n = int(stream.frames or 0)
    exact = n > 0
    if n <= 0:
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            seconds = container.duration / 1_000_000  # av.time_base
        else:
            seconds = 0.0
        n = int(round(seconds * float(fps)))
    cc = stream.codec_context
    return VideoInfo(n, fps, cc.width, cc.height, cc.name, exact)


def probe_video(path) -> VideoInfo:
    """Open a video and read its header (frame count, rate, size) without decoding."""
    container = _open(path)
    try:
        info = _info(container, path)
    finally:
        container.close()
    if info.num_frames <= 0:
        raise CorruptFileError(path, "video has no frames (or no duration in its header)")
    return info


def _frame_index(frame, start_pts, time_base, fps) -> int:
    pts = frame.pts if frame.pts is not None else frame.dts
    if pts is None:
        return -1
    return int(round(float((pts - start_pts) * time_base * fps)))


def _rgb(frame, size: list) -> np.ndarray:
    """``frame`` as ``(H, W, 3)`` uint8 at the clip's size: ``size`` holds ``(width, height)``
    of the video's first frame (from the stream header; else set here from the first frame
    converted); a frame of another size (the stream changed resolution) is scaled to it, as
    mmaction2's decoders do."""
    if not size:
        size.extend((frame.width, frame.height))
    if (frame.width, frame.height) != tuple(size):
        return frame.to_ndarray(format="rgb24", width=size[0], height=size[1], interpolation="BILINEAR")
    return frame.to_ndarray(format="rgb24")


def read_video_frames(
    path,
    indices: Sequence[int],
    *,
    seek_gap: int = 32,
    tolerance: int = 2,
    stats: dict | None = None,
) -> torch.Tensor:
    """Decode only the frames ``indices`` of a video (``(N, H, W, 3)`` uint8).

    The wanted frames are grouped into runs; for each run the reader seeks to the key
    frame before it and decodes forward until the run's last frame, so a 16-frame clip
    of a long video costs a few GOPs, not the whole file.  A new seek starts whenever
    the next wanted frame is more than ``seek_gap`` frames after the previous one.

    Indices past the true end of the stream (header frame counts can be off by one or
    two) are clamped to the last decoded frame if they are within ``tolerance`` frames of
    it; a larger shortfall means the file is truncated and raises :class:`CorruptFileError`.
    ``stats``, if given, receives ``decoded`` (frames decoded) and ``seeks``.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size == 0:
        raise ValueError("indices must not be empty")
    if indices.min() < 0:
        raise ValueError(f"indices must be >= 0, got {int(indices.min())}")
    wanted = np.unique(indices)
    container = _open(path)
    got: dict[int, np.ndarray] = {}
    last_idx, last_frame = -1, None  # the latest frame seen in presentation order
    size: list = []  # (width, height) every returned frame has
    counts = {"decoded": 0, "seeks": 0}
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = Fraction(stream.average_rate or stream.guessed_rate or stream.base_rate or 0)
        if not fps:
            raise CorruptFileError(path, "unknown frame rate")
        tb = stream.time_base
        start_pts = stream.start_time or 0
        if stream.codec_context.width and stream.codec_context.height:  # the first frame's size
            size.extend((stream.codec_context.width, stream.codec_context.height))

        def decode_run(first: int, last: int, need: set, seek_to: int) -> int:
            """Decode from a seek to ``seek_to`` (a frame index); return the first index seen."""
            nonlocal last_idx, last_frame
            target = start_pts + int(Fraction(seek_to) / fps / tb)
            container.seek(target, stream=stream, backward=True, any_frame=False)
            counts["seeks"] += 1
            first_seen = None
            for frame in container.decode(stream):
                counts["decoded"] += 1
                idx = _frame_index(frame, start_pts, tb, fps)
                if first_seen is None:
                    first_seen = idx
                    if idx > first:
                        return idx  # the seek overshot: the caller retries from earlier
                if idx in need and idx not in got:
                    got[idx] = _rgb(frame, size)
                if idx > last_idx:
                    last_idx, last_frame = idx, frame
                if idx >= last:
                    break
            return first if first_seen is None else first_seen

        cuts = np.nonzero(np.diff(wanted) > seek_gap)[0] + 1
        for run in np.split(wanted, cuts):
            first, last = int(run[0]), int(run[-1])
            need = set(int(i) for i in run)
            seen = decode_run(first, last, need, first)
            if seen > first:  # inexact index: seek from the very start instead
                decode_run(first, last, need, 0)
    except DataFileError:
        raise
    except Exception as e:
        raise CorruptFileError(path, f"decoding failed ({type(e).__name__}: {e})") from None
    finally:
        container.close()
        if stats is not None:
            stats.update(counts)
    if not got and last_frame is None:
        raise CorruptFileError(path, "no frame could be decoded")
    missing = [int(i) for i in wanted if int(i) not in got]
    if missing:
        tail = None
        for i in missing:
            if i > last_idx and i - last_idx <= tolerance and last_frame is not None:
                # header frame counts can overstate the stream by a frame or two
                if tail is None:
                    try:
                        tail = _rgb(last_frame, size)
                    except Exception as e:
                        raise CorruptFileError(path, f"converting frame {last_idx} failed ({e})") from None
                got[i] = tail
            else:
                raise CorruptFileError(
                    path, f"frame {i} not found (stream ended at frame {last_idx}; truncated or damaged file)")
    try:
        return torch.from_numpy(np.stack([got[int(i)] for i in indices]))
    except ValueError as e:  # frames that still differ: named, never a bare numpy error
        raise CorruptFileError(path, f"frames of different shapes ({e})") from None


def count_decodable_frames(path) -> int:
    """Decode every frame of a video without keeping any (for ``data check``: memory stays
    flat on long videos); returns their number, :class:`CorruptFileError` if decoding fails."""
    container = _open(path)
    n = 0
    try:
        for _ in container.decode(video=0):
            n += 1
    except Exception as e:
        raise CorruptFileError(path, f"decoding failed after {n} frames ({type(e).__name__}: {e})") from None
    finally:
        container.close()
    if not n:
        raise CorruptFileError(path, "no frame could be decoded")
    return n


def read_video_all(path) -> torch.Tensor:
    """Decode every frame of a video (``(N, H, W, 3)`` uint8); for tests and benchmarks."""
    container = _open(path)
    try:
        cc = container.streams.video[0].codec_context
        size: list = [cc.width, cc.height] if cc.width and cc.height else []
        frames = [_rgb(f, size) for f in container.decode(video=0)]
    except Exception as e:
        raise CorruptFileError(path, f"decoding failed ({type(e).__name__}: {e})") from None
    finally:
        container.close()
    if not frames:
        raise CorruptFileError(path, "no frame could be decoded")
    try:
        return torch.from_numpy(np.stack(frames))
    except ValueError as e:
        raise CorruptFileError(path, f"frames of different shapes ({e})") from None


#: optical-flow images of mmaction2/denseflow "rawframes" folders (``flow_x_00001.jpg``,
#: ``flow_y_00001.jpg``, older ``x_00001.jpg``/``y_00001.jpg``), never RGB frames
_FLOW_NAME = re.compile(r"^(flow_[xy]|[xy])_\d+\.", re.IGNORECASE)
_RGB_PREFIX = "img_"  # mmaction2's RGB frames: img_00001.jpg


def _natural_key(name: str):
    """``frame_2.jpg`` before ``frame_10.jpg``: digit runs compare as numbers."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", name)]


def list_frame_files(folder, root=None) -> list[str]:
    """The RGB image files of a frame folder, in frame order (``00001.jpg``, ``00002.jpg``, ...).

    mmaction2's rawframes folders keep the RGB frames (``img_00001.jpg``) next to the
    optical flow (``flow_x_00001.jpg``, ``flow_y_00001.jpg``): when ``img_*`` files are
    present only they are taken, and flow images are never taken.  Numbers in names are
    compared as numbers (``2`` before ``10``), so unpadded names keep their order.  With
    ``root``, the folder and every frame must resolve (links followed) inside it, else
    :class:`~.files.OutsideRootError` names the first that does not."""
    folder = os.fspath(folder)
    if root is not None:
        inside_root(folder, root)
    if not os.path.isdir(folder):
        raise MissingFileError(folder, "frame folder not found")
    names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not _FLOW_NAME.match(n)]
    rgb = [n for n in names if n.lower().startswith(_RGB_PREFIX)]
    names = sorted(rgb or names, key=_natural_key)
    if not names:
        raise CorruptFileError(folder, "frame folder holds no RGB image files")
    files = [os.path.join(folder, n) for n in names]
    if root is not None:
        guard = PathGuard()
        for f in files:
            guard(f, root)
    return files


def _decode_image(path, size: tuple) -> np.ndarray:
    """One frame as ``(H, W, 3)`` uint8 at the clip's size ``size`` (``(width, height)``);
    PIL, as torchvision's JPEG decoder is deprecated."""
    from PIL import Image

    from .images import load_image

    image = load_image(path)
    if image.size != size:
        image = image.resize(size, Image.BILINEAR)
    return np.asarray(image)


def _image_size(path) -> tuple[int, int]:
    """``(width, height)`` of an image file, from its header (nothing decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:
        raise CorruptFileError(path, f"cannot decode image ({type(e).__name__}: {e})") from None


def read_frame_folder(folder, indices: Sequence[int], files: list[str] | None = None) -> torch.Tensor:
    """Read frames ``indices`` (0-based, in name order) of a JPEG frame folder; a frame of
    another size than the folder's first frame is scaled to it."""
    files = files if files is not None else list_frame_files(folder)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size == 0:
        raise ValueError("indices must not be empty")
    cache: dict[int, np.ndarray] = {}
    size = _image_size(files[0]) if len(files) else None
    out = []
    for i in indices:
        i = int(i)
        if not 0 <= i < len(files):
            raise CorruptFileError(folder, f"frame {i} requested but the folder has {len(files)} frames")
        if i not in cache:
            cache[i] = _decode_image(files[i], size)
        out.append(cache[i])
    try:
        return torch.from_numpy(np.stack(out))
    except ValueError as e:
        raise CorruptFileError(folder, f"frames of different shapes ({e})") from None


_CODECS = {".mp4": ("libx264", "yuv420p"), ".webm": ("libvpx-vp9", "yuv420p"), ".mkv": ("libx264", "yuv420p"),
           ".avi": ("mpeg4", "yuv420p")}


def write_video(path, frames, fps: int = 12, *, codec: str | None = None, pix_fmt: str | None = None,
                options: dict | None = None, gop: int | None = None) -> None:
    """Write ``frames`` (``(N, H, W, 3)`` uint8 array or tensor) as a video with PyAV.

    The codec follows the extension (mp4: H.264, webm: VP9, avi: MPEG-4 part 2) unless
    given.  ``codec="libvpx-vp9", pix_fmt="gbrp", options={"lossless": "1"}`` is exact.
    Used by the exporters, the tests and the decoding benchmark.
    """
    import av

    frames = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be a (N, H, W, 3) uint8 array, got {frames.dtype} {frames.shape}")
    ext = os.path.splitext(os.fspath(path))[1].lower()
    dcodec, dpix = _CODECS.get(ext, ("libx264", "yuv420p"))
    codec = codec or dcodec
    pix_fmt = pix_fmt or dpix
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=dict(options or {}))
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = pix_fmt
        if gop is not None:
            stream.codec_context.gop_size = int(gop)
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
