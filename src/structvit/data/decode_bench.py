"""Decoding throughput: seeking to a clip against decoding the whole video (``structvit data bench-decode``)."""
from __future__ import annotations

import os
import time

__all__ = ["bench_decode"]


def bench_decode(*, seconds: float = 10, height: int = 320, fps: int = 30, gop: int = 60, frames: int = 16,
                 stride: int = 4, repeats: int = 10, workdir=None) -> dict:
    """Clips/s reading a ``frames``-frame clip (seeking) vs decoding the whole video."""
    import tempfile

    import numpy as np

    from .sampling import dense_indices
    from .video import read_video_all, read_video_frames, write_video

    width = int(round(height * 16 / 9 / 2)) * 2
    n = int(seconds * fps)
    tmp = tempfile.TemporaryDirectory(dir=workdir)
    path = os.path.join(tmp.name, "bench.mp4")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    video = np.stack([np.roll(base, 3 * i, axis=1) for i in range(n)])
    write_video(path, video, fps=fps, gop=gop)
    del video
    r = np.random.default_rng(1)
    t0 = time.perf_counter()
    decoded = 0
    for _ in range(repeats):
        stats = {}
        read_video_frames(path, dense_indices(n, frames, stride, train=True, rng=r)[0], stats=stats)
        decoded += stats["decoded"]
    seek = repeats / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    full_reps = max(1, repeats // 5)
    for _ in range(full_reps):
        read_video_all(path)
    full = full_reps / (time.perf_counter() - t0)
    tmp.cleanup()
    return {"video": f"{seconds:g} s, {width}x{height}, {fps} fps, GOP {gop} (H.264)", "clip": f"{frames} frames, stride {stride}",
            "seek_clips_per_s": seek, "full_decode_videos_per_s": full, "speedup": seek / full,
            "frames_decoded_per_clip": decoded / repeats, "frames_in_video": n}
