"""Built-in data: digits and moving digits, and the data modules over them."""
import time

import numpy as np
import pytest
import torch

from structvit.data import (
    MOVING_DIGITS_CLASSES,
    TIME_PAIRS,
    DigitsDataset,
    ImageDataModule,
    VideoDataModule,
    build_datamodule,
    digits_split,
    load_digit_images,
    make_moving_digits,
    moving_digits_dataset,
)
from structvit.data.transforms import IMAGENET_MEAN, IMAGENET_STD


# ----------------------------------------------------------------------------- digits
def test_digits_split_is_fixed_disjoint_and_complete():
    images, targets = load_digit_images()
    assert images.shape == (1797, 8, 8) and targets.shape == (1797,)
    tr, va = digits_split("train"), digits_split("val")
    assert len(tr) == 1438 and len(va) == 359
    assert not set(tr) & set(va)
    assert sorted(set(tr) | set(va)) == list(range(1797))
    assert np.array_equal(tr, digits_split("train"))


def test_digits_dataset_shapes_labels_and_normalisation():
    ds = DigitsDataset("val", size=32)
    assert len(ds) == 359 and ds.num_classes == 10
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    _, targets = load_digit_images()
    assert y == targets[digits_split("val")[0]]
    assert [ds[i][1] for i in range(20)] == targets[digits_split("val")[:20]].tolist()
    # background pixels (0) map to -mean/std in every channel
    corner = x[:, 0, 0]
    assert torch.allclose(corner, -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD), atol=1e-4)
    # three identical channels before normalisation
    raw = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        DigitsDataset("holdout")
    with pytest.raises(ValueError, match="size"):
        DigitsDataset("train", size=4)
    with pytest.raises(ValueError, match="std"):
        DigitsDataset("train", std=(0.1, 0.0, 0.1))


# ----------------------------------------------------------------------------- moving digits
def test_moving_digits_shapes_balance_split_and_speed():
    t0 = time.perf_counter()
    tr_clips, tr_labels, tr_src = make_moving_digits("train", seed=123)
    va_clips, va_labels, va_src = make_moving_digits("val", seed=123)
    assert time.perf_counter() - t0 < 30  # ~2 s on 2 idle cores
    assert tr_clips.shape == (1438, 8, 32, 32, 3) and tr_clips.dtype == torch.uint8
    assert va_clips.shape == (359, 8, 32, 32, 3)
    counts = torch.bincount(tr_labels, minlength=10)
    assert counts.max() - counts.min() <= 1 and len(MOVING_DIGITS_CLASSES) == 10
    # split by source image, the same split as digits
    assert not set(tr_src) & set(va_src)
    assert np.array_equal(np.sort(va_src), digits_split("val"))
    # frames are not static
    assert (tr_clips[:, 0].float() - tr_clips[:, -1].float()).abs().mean() > 5


def test_moving_digits_deterministic_given_seed():
    a = make_moving_digits("val", seed=7)
    b = make_moving_digits("val", seed=7)
    c = make_moving_digits("val", seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def _scene(label, **kw):
    src = np.arange(24)
    return make_moving_digits("train", seed=3, labels=label, source_index=src, num_distractors=0, noise=0.0, **kw)[0]


@pytest.mark.parametrize("a,b,how", TIME_PAIRS)
def test_moving_digits_classes_need_frame_order(a, b, how):
    """The twin class shows exactly the same frames in another order, so a frame-order-blind
    model cannot separate them; and the order change is a real change."""
    clip_a, clip_b = _scene(a), _scene(b)
    permuted = clip_a.flip(1) if how == "reverse" else clip_a.roll(clip_a.shape[1] // 2, dims=1)
    assert torch.equal(clip_b, permuted)
    assert not torch.equal(clip_a, clip_b)
    # same bag of frames: identical time averages
    assert torch.allclose(clip_a.float().mean(1), clip_b.float().mean(1))


def test_moving_digits_motion_directions():
    """Check the sign of each motion by the digit's centre of mass / size over time."""
    def com(clip):  # (N, T, H, W, 3) on a flat background: brightness-weighted centre
        w = clip.float().mean(-1)
        w = (w - w.amin((2, 3), keepdim=True)).clamp(min=0)
        ys, xs = torch.meshgrid(torch.arange(32.), torch.arange(32.), indexing="ij")
        m = w.sum((2, 3))
        return (w * xs).sum((2, 3)) / m, (w * ys).sum((2, 3)) / m, m

    kw = dict(clutter=0.0)
    x, _, _ = com(_scene(0, **kw))
    assert (x[:, -1] < x[:, 0]).all()  # move_left
    x, _, _ = com(_scene(1, **kw))
    assert (x[:, -1] > x[:, 0]).all()  # move_right
    _, y, _ = com(_scene(2, **kw))
    assert (y[:, -1] < y[:, 0]).all()  # move_up (y axis down)
    _, y, _ = com(_scene(3, **kw))
    assert (y[:, -1] > y[:, 0]).all()
    _, _, m = com(_scene(4, **kw))
    assert (m[:, -1] > 1.5 * m[:, 0]).all()  # approach: grows
    x, _, _ = com(_scene(8, **kw))
    mid = x.shape[1] // 2
    assert (x[:, mid] < x[:, 0]).all() and (x[:, -1] > x[:, mid]).all()  # left, then right


def test_moving_digits_bad_arguments():
    with pytest.raises(ValueError, match="num_frames"):
        make_moving_digits("train", num_frames=7)
    with pytest.raises(TypeError, match="size"):
        make_moving_digits("train", size=32.0)
    with pytest.raises(ValueError, match="labels"):
        make_moving_digits("train", labels=10, source_index=[0, 1])


def test_moving_digits_dataset_sample_format():
    ds = moving_digits_dataset("val")
    x, y = ds[3]
    assert x.shape == (3, 8, 32, 32) and x.dtype == torch.float32
    assert isinstance(y, int) and 0 <= y < 10
    assert ds.num_classes == 10 and ds.classes[0] == "move_left"
    np.testing.assert_array_equal(ds.last_indices, np.arange(8)[None])  # all frames, in order


# ----------------------------------------------------------------------------- data modules
def test_video_datamodule_moving_digits_loaders():
    dm = VideoDataModule("moving_digits", batch_size=16, num_clips=2, num_crops=3)
    assert dm.num_classes == 10 and dm.hparams.flip is False
    dm.setup("fit")
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (16, 3, 8, 32, 32) and yb.dtype == torch.int64
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (16, 3, 8, 32, 32)
    dm.setup("test")
    xt, yt = next(iter(dm.test_dataloader()))
    assert xt.shape == (16, 6, 3, 8, 32, 32)  # num_clips x num_crops views
    assert torch.equal(yt, yv)
    # validation order is deterministic
    assert torch.equal(next(iter(dm.val_dataloader()))[0], xv)
    total = sum(len(y) for _, y in dm.val_dataloader())
    assert total == 359


def test_video_datamodule_with_two_workers_matches_single_process():
    kw = dict(batch_size=64, persistent_workers=True)
    dm0 = VideoDataModule("moving_digits", num_workers=0, **kw)
    dm2 = VideoDataModule("moving_digits", num_workers=2, **kw)
    y0 = torch.cat([y for _, y in dm0.val_dataloader()])
    batches = list(dm2.val_dataloader())
    y2 = torch.cat([y for _, y in batches])
    assert torch.equal(y0, y2)
    assert torch.equal(batches[0][0], next(iter(dm0.val_dataloader()))[0])
    assert dm2.val_dataloader().persistent_workers


def test_image_datamodule_digits():
    dm = build_datamodule("digits", batch_size=32)
    assert isinstance(dm, ImageDataModule) and dm.num_classes == 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 32, 32) and y.shape == (32,)
    n_val = sum(len(y) for _, y in dm.val_dataloader())
    assert n_val == 359


def test_datamodule_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="dataset"):
        VideoDataModule("mnist")
    with pytest.raises(ValueError, match="root"):
        VideoDataModule("ssv2")
    with pytest.raises(ValueError, match="sampling"):
        VideoDataModule("moving_digits", sampling="random")
    with pytest.raises(ValueError, match="batch_size"):
        VideoDataModule("moving_digits", batch_size=0)
    with pytest.raises(TypeError, match="num_workers"):
        VideoDataModule("moving_digits", num_workers=1.5)
    with pytest.raises(ValueError, match="randaugment"):
        VideoDataModule("moving_digits", randaugment="autoaug")
    with pytest.raises(ValueError, match="crop"):
        VideoDataModule("moving_digits", crop="corner")
    with pytest.raises(ValueError, match="dataset"):
        ImageDataModule("cifar")
    with pytest.raises(ValueError, match="root"):
        ImageDataModule("imagenet")


# ----------------------------------------------------------------------------- digit relations
def _relations(split="val", **kw):
    from structvit.data.builtin import make_digit_relations

    return make_digit_relations(split, samples_per_image=1, **kw)


def test_digit_relations_shapes_balance_pairs_and_split():
    from structvit.data.builtin import RELATION_CLASSES

    images, labels, pairs = _relations("val")
    assert images.shape == (359, 32, 32, 3) and images.dtype == torch.uint8
    assert labels.shape == (359,) and set(labels.tolist()) == set(range(len(RELATION_CLASSES)))
    counts = torch.bincount(labels, minlength=4)
    assert counts.max() - counts.min() <= 1  # balanced
    assert (pairs[:, 1] == digits_split("val")).all()  # the big digit: each source image once
    val = set(digits_split("val"))
    assert set(pairs.ravel()) <= val  # both digits from the split's own images
    _, _, train_pairs = _relations("train")
    assert not set(train_pairs.ravel()) & val


def test_digit_relations_layout_matches_the_class():
    _, labels, _, centres = _relations("val", with_layout=True)
    d = centres[:, 1] - centres[:, 0]  # from the small digit to the big one, (x, y), y down
    r = np.hypot(d[:, 0], d[:, 1])
    assert (r >= 12 - 1e-6).all() and (r <= 17 + 1e-6).all()
    axis = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]])[labels.numpy()]  # left, right, above, below
    cos = (d * axis).sum(1) / r
    assert (cos >= np.cos(np.deg2rad(30)) - 1e-9).all()  # within 30 degrees of the class's axis
    assert (centres > 0.3 * 13 - 1e-6).all() and (centres < 32 - 0.3 * 13 + 1e-6).all()  # both inside


def test_digit_relations_deterministic_and_seed_dependent():
    a, la, pa = _relations("val", seed=3)
    b, lb, pb = _relations("val", seed=3)
    assert torch.equal(a, b) and torch.equal(la, lb) and (pa == pb).all()
    c, _, _ = _relations("val", seed=4)
    assert not torch.equal(a, c)


def test_digit_relations_draws_both_digits():
    # clean images: no clutter, noise or distractors; background colour stays where no digit is
    images, _, _, centres = _relations("val", num_distractors=0, clutter=0.0, noise=0.0, with_layout=True)
    for i in range(5):
        img = images[i].float()
        bg = img[0, 0]
        for k in range(2):
            x, y = (int(round(v)) for v in centres[i, k])
            patch = img[max(0, y - 5):y + 6, max(0, x - 5):x + 6]
            assert (patch - bg).abs().amax() > 60, (i, k)  # a digit stroke near each centre


def test_digit_relations_datamodule_and_bad_arguments():
    from structvit.data.builtin import DigitRelationsDataModule, DigitRelationsDataset, make_digit_relations

    dm = DigitRelationsDataModule(batch_size=8, options={"samples_per_image": 1})
    assert dm.num_classes == 4 and len(dm.classes) == 4
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8,)
    ds = DigitRelationsDataset("val", samples_per_image=1)
    img, label = ds[0]
    raw = ds.images[0].float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(img, (raw - mean) / std) and label == int(ds.targets[0])
    assert len(dm.train_dataloader()) == 1438 // 8  # drop_last in training
    with pytest.raises(ValueError, match="batch_size"):
        DigitRelationsDataModule(batch_size=0)
    with pytest.raises(TypeError, match="options"):
        DigitRelationsDataModule(options=[1])
    with pytest.raises(ValueError, match="samples_per_image"):
        make_digit_relations("val", samples_per_image=0)
    with pytest.raises(ValueError, match="num_distractors"):
        make_digit_relations("val", num_distractors=-1)
    with pytest.raises(ValueError, match="split"):
        make_digit_relations("tset")


def test_digit_relations_big_digit_is_bigger():
    # one digit at a time on a blank canvas: the big one covers more pixels than the small one
    from structvit.data.builtin import make_digit_relations

    images, _, _, centres = make_digit_relations("val", samples_per_image=1, num_distractors=0, clutter=0.0,
                                                 noise=0.0, with_layout=True)
    img = images[:50].float().amax(-1)  # (50, 32, 32)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    ink = img > img[:, :1, :1] + 40
    for i in range(50):
        c = torch.from_numpy(centres[i]).float()  # (2, 2): small, big
        d_small = (xs - c[0, 0]) ** 2 + (ys - c[0, 1]) ** 2
        d_big = (xs - c[1, 0]) ** 2 + (ys - c[1, 1]) ** 2
        small_ink = (ink[i] & (d_small < d_big)).sum()
        big_ink = (ink[i] & (d_big <= d_small)).sum()
        assert big_ink > small_ink, i
