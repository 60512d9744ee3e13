"""Tiny datasets written in the official layouts of the six benchmarks.

For tests, demos and ``structvit data check`` dry runs: real video files (PyAV), real
JPEG frames and real annotation files, a few videos each.  Every frame carries its own
index as an 8-bit pattern of black/white blocks in its top rows, which survives lossy
coding, so a test can read back exactly which frames were sampled
(:func:`decode_frame_index`).
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import torch

from .video import write_video

__all__ = ["pattern_frames", "decode_frame_index", "write_kinetics400", "write_ssv2", "write_ssv1",
           "write_diving48", "write_finegym", "write_jpeg_frames", "write_resizing_video", "FIXTURE_WRITERS"]

_BITS = 8


def pattern_frames(num_frames: int, height: int = 48, width: int = 64, *, seed: int = 0, first: int = 0) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 frames; frame ``i`` shows ``(first + i) % 256`` in binary in
    its top ``height // 3`` rows (8 blocks, least significant bit on the left) above a
    smooth coloured gradient that depends on ``seed``."""
    if width % _BITS:
        raise ValueError(f"width must be a multiple of {_BITS}, got {width}")
    rng = np.random.default_rng(seed)
    col = rng.uniform(60, 200, size=3)
    ys, xs = np.mgrid[0:height, 0:width]
    base = (col[None, None, :] * (0.6 + 0.4 * (xs / width))[..., None]).astype(np.uint8)
    frames = np.repeat(base[None], num_frames, 0)
    bw = width // _BITS
    band = height // 3
    for i in range(num_frames):
        v = (first + i) % 256
        for b in range(_BITS):
            frames[i, :band, b * bw:(b + 1) * bw] = 255 if (v >> b) & 1 else 0
    return frames


def decode_frame_index(frames) -> list[int]:
    """Inverse of :func:`pattern_frames` for ``(N, H, W, 3)`` frames (any uint8 tensor/array)."""
    f = torch.as_tensor(np.asarray(frames)).float()
    n, h, w, _ = f.shape
    band = f[:, h // 12: h // 3 - h // 12].mean(dim=(1, 3))  # (N, W), rows well inside the band
    bw = w // _BITS
    bits = torch.stack([band[:, b * bw + bw // 4: (b + 1) * bw - bw // 4].mean(1) > 127.5 for b in range(_BITS)], 1)
    return (bits.long() * (2 ** torch.arange(_BITS))).sum(1).tolist()


def write_jpeg_frames(folder, frames, *, template: str = "{:05d}.jpg", start: int = 1, quality: int = 95) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(np.asarray(frames)):
        Image.fromarray(img).save(os.path.join(folder, template.format(start + i)), quality=quality)


def write_resizing_video(path, segments, fps: int = 8, codec: str = "libx264") -> None:
    """A video whose frame size changes mid-stream: ``segments`` is a list of ``(N, H, W, 3)``
    uint8 arrays of different sizes, each encoded by its own encoder into the one video
    stream of ``path`` (as a camera or an edited clip that switches resolution does)."""
    from fractions import Fraction

    import av

    pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = np.asarray(segments[0]).shape[1:3]
        stream.pix_fmt = pix_fmt
        pts = 0
        for k, segment in enumerate(segments):
            segment = np.asarray(segment)
            if k == 0:
                encoder = stream.codec_context
            else:  # the stream's encoder has a fixed size: a new one for each size
                encoder = av.CodecContext.create(codec, "w")
                encoder.height, encoder.width = segment.shape[1:3]
                encoder.pix_fmt, encoder.time_base, encoder.framerate = pix_fmt, Fraction(1, fps), Fraction(fps)
                encoder.open()
            for img in [*segment, None]:
                frame = None
                if img is not None:
                    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                    frame.pts, frame.time_base = pts, Fraction(1, fps)
                    pts += 1
                for packet in encoder.encode(frame):
                    packet.stream = stream
                    container.mux(packet)


def write_kinetics400(root, *, frames: int = 40, size=(48, 64)) -> dict:
    """``annotations/{train,val}.csv`` + ``{split}/{label}/{youtube_id}_{start:06d}_{end:06d}.mp4``."""
    classes = ["abseiling", "air drumming", "zumba"]  # written unsorted below: order comes from sorting
    rows = {"train": [("zumba", "aaaaaaaaaa1", 10, 20), ("abseiling", "bbbbbbbbbb2", 0, 10),
                      ("air drumming", "ccccccccc-3", 5, 15), ("abseiling", "dddd_dddd_4", 30, 40)],
            "val": [("air drumming", "eeeeeeeeee5", 2, 12), ("zumba", "ffffffffff6", 100, 110)]}
    expected = {}
    for split, rs in rows.items():
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        with open(os.path.join(root, "annotations", f"{split}.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
            for i, (lab, yid, s, e) in enumerate(rs):
                w.writerow([lab, yid, s, e, split])
                name = f"{yid}_{s:06d}_{e:06d}"
                write_video(os.path.join(root, split, lab, name + ".mp4"), pattern_frames(frames, *size, seed=i),
                            fps=10, gop=8)
        expected[split] = [(f"{yid}_{s:06d}_{e:06d}", sorted(classes).index(lab), frames) for lab, yid, s, e in rs]
    return {"classes": sorted(classes), "expected": expected}


SSV2_TEMPLATES = ["Moving [something] from left to right", "Moving [something] from right to left",
                  "Pushing [something] so that it slightly moves"]


def write_ssv2(root, *, frames: int = 24, size=(48, 64)) -> dict:
    """``labels/something-something-v2-{labels,train,validation}.json`` + ``20bn-something-something-v2/{id}.webm``."""
    labels = {t.replace("[", "").replace("]", ""): str(i) for i, t in enumerate(SSV2_TEMPLATES)}
    ldir = os.path.join(root, "labels")
    os.makedirs(ldir, exist_ok=True)
    with open(os.path.join(ldir, "something-something-v2-labels.json"), "w") as f:
        json.dump(labels, f, indent=1)
    splits = {"train": [(101, 0), (102, 2), (103, 1)], "validation": [(201, 1), (202, 0)]}
    expected = {}
    for split, items in splits.items():
        entries = []
        for vid, lab in items:
            t = SSV2_TEMPLATES[lab]
            entries.append({"id": str(vid), "label": t.replace("[something]", "a pen").lower(), "template": t,
                            "placeholders": ["a pen"] * t.count("[something]")})
            write_video(os.path.join(root, "20bn-something-something-v2", f"{vid}.webm"),
                        pattern_frames(frames, *size, seed=vid), fps=12, gop=6)
        with open(os.path.join(ldir, f"something-something-v2-{split}.json"), "w") as f:
            json.dump(entries, f)
        expected["train" if split == "train" else "val"] = [(str(v), lab, frames) for v, lab in items]
    return {"classes": [t.replace("[", "").replace("]", "") for t in SSV2_TEMPLATES], "expected": expected}


def write_ssv1(root, *, frames: int = 16, size=(48, 64)) -> dict:
    """``something-something-v1-{labels,train,validation}.csv`` + ``20bn-something-something-v1/{id}/00001.jpg``."""
    classes = ["Holding something", "Turning something upside down", "Pushing something from left to right"]
    with open(os.path.join(root, "something-something-v1-labels.csv"), "w") as f:
        f.write("\n".join(classes) + "\n")
    splits = {"train": [(11, 2), (12, 0), (13, 1)], "validation": [(21, 1), (22, 2)]}
    expected = {}
    for split, items in splits.items():
        with open(os.path.join(root, f"something-something-v1-{split}.csv"), "w") as f:
            for vid, lab in items:
                f.write(f"{vid};{classes[lab]}\n")
                write_jpeg_frames(os.path.join(root, "20bn-something-something-v1", str(vid)),
                                  pattern_frames(frames, *size, seed=vid))
        expected["train" if split == "train" else "val"] = [(str(v), lab, frames) for v, lab in items]
    return {"classes": classes, "expected": expected}


def write_diving48(root, *, frames: int = 30, size=(48, 64), as_frames: bool = False) -> dict:
    """``Diving48_V2_{train,test}.json`` + ``Diving48_vocab.json`` + ``rgb/{vid_name}.mp4``
    (or ``frames/{vid_name}/00001.jpg`` with ``as_frames``)."""
    vocab = [["Back", "15som", "NoTwis", "PIKE"], ["Back", "15som", "05Twis", "FREE"]] + \
        [["Forward", f"{i}som", "NoTwis", "TUCK"] for i in range(46)]
    with open(os.path.join(root, "Diving48_vocab.json"), "w") as f:
        json.dump(vocab, f)
    splits = {"train": [("_8Vy3dlHg2w_00000", 0, 0, frames), ("-mmq0PT-u8k_00155", 47, 4, frames - 2)],
              "test": [("0sKbfbTPdAo_00036", 1, 0, frames)]}
    expected = {}
    for split, items in splits.items():
        with open(os.path.join(root, f"Diving48_V2_{split}.json"), "w") as f:
            json.dump([{"vid_name": v, "label": lab, "start_frame": s, "end_frame": e} for v, lab, s, e in items], f)
        for i, (v, _lab, _s, _e) in enumerate(items):
            fr = pattern_frames(frames, *size, seed=i)
            if as_frames:
                write_jpeg_frames(os.path.join(root, "frames", v), fr)
            else:
                write_video(os.path.join(root, "rgb", v + ".mp4"), fr, fps=10, gop=8)
        expected["train" if split == "train" else "val"] = [(v, lab, frames, s, e) for v, lab, s, e in items]
    return {"classes": [" ".join(v) for v in vocab], "expected": expected}


def write_finegym(root, *, frames: int = 20, size=(48, 64), variant: str = "gym99") -> dict:
    """``{variant}_{train_element_v1.1,val_element}.txt`` + ``{variant}_categories.txt`` +
    ``subactions/{clip_id}.mp4``."""
    k = 99 if variant == "gym99" else 288
    with open(os.path.join(root, f"{variant}_categories.txt"), "w") as f:
        for i in range(k):
            f.write(f"Clabel: {i}; set: {1 + i // 10}; Glabel: {i + 1}; (VT) element number {i}\n")
    splits = {"train_element_v1.1": [("A0xAXXysHUo_E_002407_002435_A_0003_0005", 5),
                                     ("A0xAXXysHUo_E_002407_002435_A_0010_0012", k - 1)],
              "val_element": [("0LtLS9wROrk_E_001170_001237_A_0030_0031", 0)]}
    expected = {}
    for split, items in splits.items():
        with open(os.path.join(root, f"{variant}_{split}.txt"), "w") as f:
            for i, (clip, lab) in enumerate(items):
                f.write(f"{clip} {lab}\n")
                write_video(os.path.join(root, "subactions", clip + ".mp4"), pattern_frames(frames, *size, seed=i),
                            fps=10, gop=8)
        expected["train" if split.startswith("train") else "val"] = [(c, lab, frames) for c, lab in items]
    return {"classes": [f"(VT) element number {i}" for i in range(k)], "expected": expected}


FIXTURE_WRITERS = {"kinetics400": write_kinetics400, "ssv2": write_ssv2, "ssv1": write_ssv1,
                   "diving48": write_diving48, "gym99": write_finegym,
                   "gym288": lambda root, **kw: write_finegym(root, variant="gym288", **kw)}
