"""Video decoding (PyAV, seeking), frame folders, frame sampling and clip-consistent transforms."""
import os
import random

import numpy as np
import pytest
import torch

from structvit.data import (
    CorruptFileError,
    FrameSampler,
    MissingFileError,
    VideoTransform,
    dense_indices,
    probe_video,
    read_frame_folder,
    read_video_frames,
    segment_indices,
    write_video,
)
from structvit.data.fixtures import decode_frame_index, pattern_frames, write_jpeg_frames
from structvit.data.video import list_frame_files, read_video_all

CODECS = [("mp4", {}), ("mp4", {"codec": "mpeg4"}), ("webm", {}), ("webm", {"codec": "vp8"})]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    frames = pattern_frames(120, 48, 64)
    paths = {}
    for ext, kw in CODECS:
        p = d / f"v_{kw.get('codec', 'default')}.{ext}"
        write_video(p, frames, fps=25, gop=12, **kw)
        paths[(ext, kw.get("codec"))] = str(p)
    return paths


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("key", [(e, k.get("codec")) for e, k in CODECS], ids=lambda k: f"{k[0]}-{k[1]}")
def test_read_video_frames_returns_exactly_the_requested_frames(videos, key):
    path = videos[key]
    info = probe_video(path)
    assert info.num_frames == 120 and (info.width, info.height) == (64, 48)
    idx = [0, 5, 50, 51, 52, 110, 119, 3, 119, 0]
    out = read_video_frames(path, idx)
    assert out.shape == (10, 48, 64, 3) and out.dtype == torch.uint8
    assert decode_frame_index(out) == idx
    assert decode_frame_index(read_video_all(path)) == list(range(120))


def test_reading_a_short_clip_seeks_instead_of_decoding_everything(videos):
    path = videos[("mp4", None)]
    stats = {}
    out = read_video_frames(path, list(range(100, 116)), stats=stats)
    assert decode_frame_index(out) == list(range(100, 116))
    assert stats["decoded"] < 40  # one GOP (12) plus the clip, not 116 frames
    # two far-apart clips: two seeks, still far fewer decoded frames than the video
    stats = {}
    out = read_video_frames(path, list(range(10, 18)) + list(range(90, 98)), stats=stats)
    assert decode_frame_index(out) == list(range(10, 18)) + list(range(90, 98))
    assert stats["seeks"] == 2 and stats["decoded"] < 60


def test_corrupt_missing_and_truncated_videos_raise_with_path(tmp_path, videos):
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(os.urandom(4000))
    with pytest.raises(CorruptFileError) as e:
        read_video_frames(bad, [0])
    assert str(bad) in str(e.value) and e.value.path == str(bad)
    with pytest.raises(MissingFileError, match="nope.mp4"):
        read_video_frames(tmp_path / "nope.mp4", [0])
    for key in [("mp4", None), ("webm", None)]:
        data = open(videos[key], "rb").read()
        cut = tmp_path / ("cut." + key[0])
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(CorruptFileError, match="cut"):
            read_video_frames(cut, [0, 110])
    with pytest.raises(ValueError, match="indices"):
        read_video_frames(videos[("mp4", None)], [])


def test_frame_folder_reading(tmp_path):
    frames = pattern_frames(12, 48, 64)
    write_jpeg_frames(tmp_path / "vid", frames)
    files = list_frame_files(tmp_path / "vid")
    assert [os.path.basename(f) for f in files[:2]] == ["00001.jpg", "00002.jpg"] and len(files) == 12
    out = read_frame_folder(tmp_path / "vid", [11, 0, 4, 4])
    assert out.shape == (4, 48, 64, 3) and decode_frame_index(out) == [11, 0, 4, 4]
    (tmp_path / "vid" / "00003.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CorruptFileError, match="00003.jpg"):
        read_frame_folder(tmp_path / "vid", [2])
    with pytest.raises(CorruptFileError, match="frame 12"):
        read_frame_folder(tmp_path / "vid", [12])
    with pytest.raises(MissingFileError):
        list_frame_files(tmp_path / "missing")


# ----------------------------------------------------------------------------- sampling
def test_dense_sampling_train_and_test():
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = dense_indices(100, 8, 4, train=True, rng=rng)
        assert idx.shape == (1, 8)
        assert (np.diff(idx[0]) == 4).all() and 0 <= idx.min() and idx.max() < 100
    starts = {int(dense_indices(100, 8, 4, train=True, rng=rng)[0, 0]) for _ in range(200)}
    assert len(starts) > 20 and max(starts) <= 100 - 29  # random starts over the whole range
    test = dense_indices(100, 8, 4, train=False, num_clips=3)
    np.testing.assert_array_equal(test[:, 0], [0, 36, 71])  # uniform from first to last start
    np.testing.assert_array_equal(test[2], 71 + 4 * np.arange(8))
    np.testing.assert_array_equal(dense_indices(100, 8, 4, train=False), [35 + 4 * np.arange(8)])  # centre
    short = dense_indices(10, 8, 4, train=False)
    np.testing.assert_array_equal(short, [[0, 4, 8, 9, 9, 9, 9, 9]])  # clamped to the last frame


def test_segment_sampling_train_and_test():
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = segment_indices(80, 8, train=True, rng=rng)[0]
        assert ((idx >= 10 * np.arange(8)) & (idx < 10 * np.arange(8) + 10)).all()  # one per segment
    np.testing.assert_array_equal(segment_indices(80, 8, train=False), [5 + 10 * np.arange(8)])  # centres
    two = segment_indices(80, 8, train=False, num_clips=2)
    np.testing.assert_array_equal(two, [2 + 10 * np.arange(8), 7 + 10 * np.arange(8)])
    short = segment_indices(4, 8, train=False)[0]
    assert (np.diff(short) >= 0).all() and short.max() == 3 and short.min() == 0


def test_sampler_bad_arguments():
    with pytest.raises(ValueError, match="sampling mode"):
        FrameSampler("random")
    with pytest.raises(ValueError, match="num_frames"):
        FrameSampler("dense", num_frames=0)
    with pytest.raises(TypeError, match="frame_stride"):
        FrameSampler("dense", frame_stride=1.5)
    with pytest.raises(ValueError, match="num_video_frames"):
        dense_indices(0, 8, train=False)


# ----------------------------------------------------------------------------- transforms
def _static_clip(t=6, h=40, w=56, seed=0):
    img = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8))
    return img.unsqueeze(0).repeat(t, 1, 1, 1)


def test_train_transform_is_identical_on_every_frame():
    torch.manual_seed(0)
    tf = VideoTransform(32, train=True, crop="random_resized", flip=True, randaugment="rand-m9-n2",
                        random_erasing=1.0)
    clip = _static_clip()
    for _ in range(10):
        out = tf(clip)
        assert out.shape == (3, 6, 32, 32) and out.dtype == torch.float32
        assert torch.equal(out[:, 0:1].expand_as(out), out)  # same augmentation on every frame
    ms = VideoTransform(32, train=True, crop="multi_scale")
    out = ms(clip)
    assert out.shape == (3, 6, 32, 32) and torch.equal(out[:, :1].expand_as(out), out)


def test_randaugment_changes_clips_and_draws_per_clip():
    torch.manual_seed(0)
    tf = VideoTransform(32, train=True, crop="center", randaugment="rand-m15-n3")
    plain = VideoTransform(32, train=True, crop="center")
    clip = _static_clip(h=32, w=32)
    outs = [tf(clip) for _ in range(8)]
    assert any(not torch.allclose(o, plain(clip)) for o in outs)
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])


def test_flip_is_off_by_default_and_configurable():
    clip = torch.zeros(4, 32, 32, 3, dtype=torch.uint8)
    clip[:, :, :8] = 255  # bright left edge
    off = VideoTransform(32, train=True, crop="center")
    assert all(off(clip)[0, :, :, :8].mean() > off(clip)[0, :, :, -8:].mean() for _ in range(20))
    on = VideoTransform(32, train=True, crop="center", flip=True)
    random.seed(1)  # the transform draws from Python's random (see transforms.py)
    outs = [on(clip)[0] for _ in range(200)]
    flipped = [bool(o[:, :, -8:].mean() > o[:, :, :8].mean()) for o in outs]
    # p = 0.5 per clip: 200 draws land in (60, 140) with probability 1 - 1e-8
    assert 60 < sum(flipped) < 140


def test_test_transform_crops_and_normalisation():
    frames = torch.from_numpy(pattern_frames(4, 48, 96))
    tf = VideoTransform(32, train=False, num_crops=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = tf(frames)
    assert out.shape == (3, 3, 4, 32, 32)
    assert out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6  # (x - .5) / .5 of [0, 1]
    # left, centre and right crops of the long side differ; one crop = the centre one
    assert not torch.allclose(out[0], out[2])
    single = VideoTransform(32, train=False)(frames)
    assert torch.allclose(single, VideoTransform(32, train=False, mean=(0.485, 0.456, 0.406))(frames))
    centre = VideoTransform(32, train=False, num_crops=3)(frames)[1]
    assert torch.allclose(single, centre)


def test_transform_bad_arguments():
    with pytest.raises(ValueError, match="crop"):
        VideoTransform(32, train=True, crop="five")
    with pytest.raises(ValueError, match="mean"):
        VideoTransform(32, train=True, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="random_erasing"):
        VideoTransform(32, train=True, random_erasing=2)
    with pytest.raises(TypeError, match="input_size"):
        VideoTransform(32.0, train=True)
    with pytest.raises(TypeError, match="frames"):
        VideoTransform(32, train=True)(torch.zeros(4, 3, 32, 32))


def test_rawframes_folder_lists_rgb_frames_only_in_frame_order(tmp_path):
    from structvit.data.video import list_frame_files

    names = ["img_00002.jpg", "flow_x_00001.jpg", "img_00001.jpg", "flow_y_00001.jpg", "x_00003.jpg",
             "y_00003.jpg", "img_00010.jpg"]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    got = [os.path.basename(p) for p in list_frame_files(tmp_path)]
    assert got == ["img_00001.jpg", "img_00002.jpg", "img_00010.jpg"]
    plain = tmp_path / "plain"
    plain.mkdir()
    for n in ("10.jpg", "2.jpg", "1.jpg", "flow_x_1.jpg"):
        (plain / n).write_bytes(b"")
    assert [os.path.basename(p) for p in list_frame_files(plain)] == ["1.jpg", "2.jpg", "10.jpg"]  # numeric order
    flow_only = tmp_path / "flow"
    flow_only.mkdir()
    (flow_only / "flow_x_00001.jpg").write_bytes(b"")
    with pytest.raises(CorruptFileError, match="no RGB image files"):
        list_frame_files(flow_only)
