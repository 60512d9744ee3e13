"""The paper's figures (Kim et al., CVPR 2024, Figs. 2-4) for any StructViT model.

Every figure function takes a model, one input sample and an output path, writes the
PNG there and the numbers behind it next to it (same name, ``.npz``), and returns the
PNG path. The numbers are the layer's actual attention weights for the chosen query,
recomputed from the captured input of the block (:mod:`structvit.viz.capture`).

- :func:`attention_figure` (Fig. 2): the D attention maps of one query over the key
  grid, the learned patterns U^K and U^V, and the dynamic kernels kappa at the most
  attended keys, overlaid on the input.
- :func:`kernels_figure` (Fig. 3): the attention over the space-time key grid frame by
  frame and kappa over its (t, h, w) window at the most attended keys.
- :func:`compare_figure` (Fig. 4): the attention of the same query in SA, ConvSA and
  StructSA models side by side.
- :func:`readings_figure`: one block's scores read with both softmax normalisations:
  "joint" (one distribution over all (d, j): shares of one total, one colour scale)
  and "per_pattern" (D distributions over j, each on its own scale).

Notation: ``A`` has shape (heads, D, N') for the chosen query, over the N' keys of the
block (its key grid (T', H', W') = the token grid strided by the layer's ``kv_stride``;
N' = N at stride 1); token grids are shown as (T, H, W) (T = 1 for images). The dynamic
kernel at key j, kappa[j, o, c] = sum_d A[d, j] U^V[c, d, o], has one (kt, kh, kw) kernel
per channel c for channel-wise patterns (the paper's) and one for all channels of a head
otherwise; figures show the channel mean (``channel=None``) or one channel. A strided key
is drawn as a cell of s x s tokens centred on its window's centre. Video inputs show,
for each time step of the key grid, the input frame at its centre.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn

from ..nn.attention import StructSA
from .canvas import Canvas, kernel_unit, pyplot, save_figure, show_kernel, unit_text
from .capture import AttentionCapture, attention_layers, capture, default_block
from .query import (QueryAttention, channel_text, common_arrays, pattern_arrays, prepare_sample,
                    query_attention, query_label, reading_text)
from .variants import derive_variants

__all__ = ["QueryAttention", "query_attention", "prepare_sample", "attention_figure", "kernels_figure",
           "compare_figure", "readings_figure", "derive_variants", "write_demo_figures"]


def _pattern_maps(fig, gs, qa: QueryAttention, canvas: Canvas, maps: np.ndarray, normalize: str, ncols: int,
                  title_prefix: str = "") -> None:
    """D attention maps (D, T', H', W') over the key grid in a sub-grid of ``gs``, styled by their normalisation."""
    d = maps.shape[0]
    frames = canvas.key_frames(qa.kv_stride3, maps.shape[1])
    nrows = math.ceil(d / ncols)
    sub = gs.subgridspec(nrows, ncols, wspace=0.08, hspace=0.3)
    shares = maps.reshape(d, -1).sum(1)
    joint = normalize != "per_pattern"
    t, h, w = qa.query
    axes = []
    for i in range(d):
        ax = fig.add_subplot(sub[i // ncols, i % ncols])
        lo, hi = (float(maps.min()), float(maps.max())) if joint else (float(maps[i].min()), float(maps[i].max()))
        im = canvas.show(ax, maps[i], frames=frames, vmin=lo, vmax=hi if hi > lo else None, kv_stride=qa.kv_stride3)
        canvas.mark(ax, t, h, w, frames=frames)
        axes.append(ax)
        if normalize == "joint":
            ax.set_title(f"{title_prefix}d={i}: share {100 * shares[i]:.1f}%", fontsize=8)
        elif normalize == "per_pattern":
            ax.set_title(f"{title_prefix}d={i}: {lo:.3g} to {hi:.3g}", fontsize=8)
        else:
            ax.set_title(f"{title_prefix}attention", fontsize=8)
    if joint:
        cb = fig.colorbar(im, ax=axes, fraction=0.02, pad=0.01, aspect=30)
        cb.ax.tick_params(labelsize=6)


# --------------------------------------------------------------------------- Fig. 2


def attention_figure(model: nn.Module, sample: torch.Tensor, path, *, block: int | None = None, query=None,
                     head: int = 0, normalize: str | None = None, top_k: int = 4, channel: int | None = None) -> Path:
    """Fig. 2: structural attention of one query, with the patterns and dynamic kernels.

    Rows: the input with the query (cyan square); the D attention maps A[d, :] over the
    key grid overlaid on the input (styled by the softmax reading, see
    :func:`readings_figure`); the D pattern detectors U^K and aggregators U^V (small
    kernels, blue < 0 < red; channel-wise patterns: the mean over the head's channels and,
    in a third row, the std of U^V over them, or channel ``channel``); the dynamic kernels
    kappa at the ``top_k`` most attended keys (by attention summed over d; channel mean or
    ``channel``), drawn over the window they aggregate on the input and, numbered, next to
    it. An SA block shows its one attention map only.

    The ``.npz`` holds: ``attention`` (D, T', H', W') for the head, ``attention_all_heads``
    (heads, D, T', H', W'), ``u_k``/``u_v`` (D, kt, kh, kw) as shown, ``u_k_std``/``u_v_std``
    (std over channels), ``u_k_channels``/``u_v_channels`` (cu, D, kt, kh, kw), ``kappa``
    (top_k, kt, kh, kw) as shown, ``kappa_channels`` (top_k, cu, kt, kh, kw), ``top_keys``
    (top_k, 3) on the key grid, ``top_positions`` (their grid positions), ``top_mass``,
    ``shares`` (D,), ``frames`` (the input frames shown), and
    query/grid/key_grid/kv_stride/block/head/kind/normalize/patterns/channel (-1: mean).
    """
    plt = pyplot()
    qa = query_attention(model, sample, block, query, head, normalize, channel=channel)
    canvas = Canvas.make(qa.sample, qa.grid3)
    maps = qa.head_weights()
    d = maps.shape[0]
    T = qa.key_grid3[0]
    structural = qa.u_v is not None
    std_row = structural and qa.channelwise and qa.channel is None
    if T == 1:
        ncols = max(d, top_k + 2 if structural else 1)
        map_cols, width = ncols, max(8.0, 1.9 * ncols)
    else:  # video: attention maps are strips of T' frames, two per row
        ncols = map_cols = min(d, 2)
        width = max(10.0, 2 * 1.6 * T + 1.0)
    map_rows = math.ceil(d / map_cols)
    heights = [1.0] + [map_rows] + ([0.75, 0.75] + ([0.75] if std_row else []) + [1.1] if structural else [])
    fig = plt.figure(figsize=(width, 2.1 * sum(heights) + 0.6))
    gs = fig.add_gridspec(len(heights), 1, height_ratios=heights, hspace=0.45)
    arrays = common_arrays(qa)
    arrays.update(attention=maps, attention_all_heads=qa.weights, shares=maps.reshape(d, -1).sum(1),
                  frames=canvas.frames, frame_index=canvas.frame_index)

    top = gs[0].subgridspec(1, ncols if T == 1 else 2, wspace=0.3)
    in_span = 1
    ax = fig.add_subplot(top[0, 0:in_span])
    canvas.show(ax)
    canvas.mark(ax, *qa.query, label="q")
    ax.set_title("input and query" + (" (frames of the token grid)" if qa.grid3[0] > 1 else ""), fontsize=8)
    if d > 1:
        ax = fig.add_subplot(top[0, in_span:in_span + (2 if T == 1 else 1)])
        shares = maps.reshape(d, -1).sum(1)
        ax.bar(range(d), 100 * shares, color="tab:orange")
        ax.set_xticks(range(d))
        ax.set_xlabel("pattern d", fontsize=7)
        ax.set_ylabel("%", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_title("share of the query's attention per pattern" if qa.normalize != "per_pattern"
                     else "mass per pattern (each map sums to 1)", fontsize=8)
    _pattern_maps(fig, gs[1], qa, canvas, maps, qa.normalize, map_cols)

    if structural:
        which = channel_text(qa)
        rows = [("U^K", "pattern detectors", qa.pattern("u_k"), True),
                ("U^V", "aggregation patterns", qa.pattern("u_v"), True)]
        if std_row:
            rows.append(("std U^V", "std over channels", qa.pattern_std("u_v"), False))
        for row, (name, desc, u, signed) in enumerate(rows):
            sub = gs[2 + row].subgridspec(1, max(d, ncols) if T == 1 else d, wspace=0.1)
            vmax = float(np.abs(u).max()) or 1.0
            for i in range(d):
                ax = fig.add_subplot(sub[0, i])
                show_kernel(ax, u[i], vmax, annotate=u.shape[1] == 1, cmap="RdBu_r" if signed else "viridis",
                             signed=signed)
                ax.set_title(f"{name}[{i}]", fontsize=8)
                if i == 0:
                    ax.set_ylabel(desc + (f"\n({which})" if which and signed else ""), fontsize=7)
        keys = qa.top_keys(top_k)
        positions = [qa.key_position(k) for k in keys]
        kappas = np.stack([qa.kappa(k) for k in keys])
        mass = qa.mass()
        top_mass = np.array([mass[k] for k in keys])
        arrays.update(pattern_arrays(qa))
        arrays.update(kappa=kappas, kappa_channels=np.stack([qa.kappa_channels(k) for k in keys]),
                      top_keys=np.array(keys), top_positions=np.array(positions), top_mass=top_mass)
        kcols = ncols if T == 1 else top_k + 2
        sub = gs[2 + len(rows)].subgridspec(1, kcols, wspace=0.15)
        kmax = float(np.abs(kappas).max()) or 1.0
        unit = kernel_unit(kmax)
        frames_shown = sorted({p[0] for p in positions} | {qa.query[0]})
        span = max(1, min(kcols - top_k, 2))
        ax = fig.add_subplot(sub[0, 0:span])
        canvas.show(ax, frames=frames_shown)
        kt, kh, kw = kappas.shape[1:]
        cm = plt.get_cmap("RdBu_r")
        for n, (pos, kap) in enumerate(zip(positions, kappas)):
            slot = frames_shown.index(pos[0])
            cx, cy = canvas.cell(*pos, frame_slot=slot)
            x0, y0 = cx - kw / 2 * canvas.sw, cy - kh / 2 * canvas.sh
            ax.imshow(kap[kt // 2], cmap=cm, vmin=-kmax, vmax=kmax, alpha=0.8, interpolation="nearest",
                      extent=(x0, x0 + kw * canvas.sw, y0 + kh * canvas.sh, y0))
            ax.add_patch(plt.Rectangle((x0, y0), kw * canvas.sw, kh * canvas.sh, fill=False, ec="lime", lw=1.2))
            ax.text(cx, cy, str(n + 1), color="lime", fontsize=9, fontweight="bold", ha="center", va="center",
                    clip_on=True)
        canvas.mark(ax, *qa.query, frames=frames_shown)
        ax.set_xlim(0, len(frames_shown) * canvas.width)
        ax.set_ylim(canvas.height, 0)
        ax.set_title("kappa of the top keys over their windows" + (" (centre frame)" if kt > 1 else "")
                     + (f"\n{which}" if which else ""), fontsize=8)
        for n, (pos, kap) in enumerate(zip(positions, kappas)):
            ax = fig.add_subplot(sub[0, kcols - top_k + n])
            show_kernel(ax, kap, kmax, unit=unit, annotate=kt == 1)
            shown = pos if qa.grid3[0] > 1 else pos[1:]
            ax.set_title(f"kappa {n + 1} at {tuple(shown)}{unit_text(unit)}\nmass {100 * top_mass[n]:.1f}%",
                         fontsize=7)
    fig.suptitle(f"Structural attention (Fig. 2) - {query_label(qa)}\n{reading_text(qa.normalize)}", fontsize=9)
    return save_figure(fig, path, arrays)


# --------------------------------------------------------------------------- Fig. 3


def _require_structural(cap: AttentionCapture, model: nn.Module, what: str) -> None:
    if cap.kind == "sa":
        structural = [i for i, (_, m) in enumerate(attention_layers(model)) if isinstance(m, StructSA)]
        raise ValueError(f"block {cap.index} ({cap.name}) is plain self-attention (SA): {what} needs a StructSA or "
                         f"ConvSA block; structural blocks of this model: {structural or 'none'}")


def kernels_figure(model: nn.Module, sample: torch.Tensor, path, *, block: int | None = None, query=None,
                   head: int = 0, normalize: str | None = None, top_k: int = 4, channel: int | None = None) -> Path:
    """Fig. 3: dynamic kernels of one query over the space-time key grid.

    Top row: the query's attention summed over patterns, over the key grid frame by frame
    (one colour scale for all frames), with the query (cyan) and the ``top_k`` most
    attended keys (numbered, lime). One row per top key: kappa over its (t, h, w) window,
    one panel per temporal offset (images: one panel), one symmetric colour scale for all
    kernels. Channel-wise patterns give one kernel per channel: shown is their mean
    (default) or channel ``channel``. Needs a StructSA or ConvSA block.

    The ``.npz`` holds ``attention`` (T', H', W') summed over d, ``attention_patterns``
    (D, T', H', W'), ``kappa`` (top_k, kt, kh, kw) as shown, ``kappa_channels``
    (top_k, cu, kt, kh, kw), ``top_keys`` (top_k, 3) on the key grid, ``top_positions``,
    ``top_mass``, ``u_v`` (D, kt, kh, kw) as shown (and the other pattern arrays of
    :func:`attention_figure`), ``frames`` and query/grid/key_grid/kv_stride/block/head/kind/normalize/channel.
    """
    plt = pyplot()
    x = prepare_sample(model, sample)
    caps = capture(model, x, None if block is None else [block])
    cap = default_block(caps) if block is None else caps[0]
    _require_structural(cap, model, "a kernels plot")
    qa = query_attention(model, x, cap.index, query, head, normalize, captures=[cap], channel=channel)
    canvas = Canvas.make(qa.sample, qa.grid3)
    T = qa.key_grid3[0]
    key_frames = canvas.key_frames(qa.kv_stride3, T)
    mass = qa.mass()
    keys = qa.top_keys(top_k)
    positions = [qa.key_position(k) for k in keys]
    kappas = np.stack([qa.kappa(k) for k in keys])
    kt = kappas.shape[1]
    top_mass = np.array([mass[k] for k in keys])
    kmax = float(np.abs(kappas).max()) or 1.0
    unit = kernel_unit(kmax)
    offsets = np.arange(kt) - kt // 2
    if kt == 1:  # images: keys side by side (locations above their kernels)
        ncols = max(T, top_k)
        fig = plt.figure(figsize=(max(7.0, 2.2 * ncols), 7.4))
        gs = fig.add_gridspec(3, ncols, hspace=0.45, wspace=0.2)
    else:  # video: one row per key, one column per temporal offset of the window
        ncols = max(T, kt + 1)
        fig = plt.figure(figsize=(max(7.0, 2.1 * ncols), 2.2 * (1 + top_k) + 0.5))
        gs = fig.add_gridspec(1 + top_k, ncols, hspace=0.55, wspace=0.15)
    lo, hi = float(mass.min()), float(mass.max())
    top_axes = []
    for t, frame in enumerate(key_frames):
        ax = fig.add_subplot(gs[0, t])
        im = canvas.show(ax, mass[t:t + 1], frames=[frame], vmin=lo, vmax=hi if hi > lo else None,
                         kv_stride=qa.kv_stride3)
        canvas.mark(ax, *qa.query, frames=[frame], label="q")
        for n, pos in enumerate(positions):
            canvas.mark(ax, *pos, frames=[frame], color="lime", label=str(n + 1), marker="o")
        ax.set_title(f"key frame t={t} (input frame {canvas.frame_index[frame]})\nmass {100 * mass[t].sum():.1f}%"
                     if T > 1 else "attention over keys (sum over d)", fontsize=8)
        top_axes.append(ax)
    fig.colorbar(im, ax=top_axes, fraction=0.02, pad=0.01).ax.tick_params(labelsize=6)
    for n, (pos, kap) in enumerate(zip(positions, kappas)):
        shown = pos if qa.grid3[0] > 1 else pos[1:]
        ax = fig.add_subplot(gs[1, n] if kt == 1 else gs[1 + n, 0])
        canvas.show(ax, frames=[pos[0]])
        canvas.mark(ax, *pos, frames=[pos[0]], color="lime", label=str(n + 1), marker="o")
        canvas.mark(ax, *qa.query, frames=[pos[0]])
        ax.set_title(f"key {n + 1} at {tuple(shown)}, mass {100 * top_mass[n]:.1f}%", fontsize=8)
        for s in range(kt):
            ax = fig.add_subplot(gs[2, n] if kt == 1 else gs[1 + n, 1 + s])
            im = show_kernel(ax, kap[s:s + 1], kmax, unit=unit)
            name = f"kappa {n + 1}" + (f", dt={offsets[s]:+d}" if kt > 1 else "")
            ax.set_title(name + unit_text(unit), fontsize=8)
        if n == 0:
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    arrays = common_arrays(qa)
    arrays.update(pattern_arrays(qa))
    arrays.update(attention=mass, attention_patterns=qa.head_weights(), kappa=kappas,
                  kappa_channels=np.stack([qa.kappa_channels(k) for k in keys]), top_keys=np.array(keys),
                  top_positions=np.array(positions), top_mass=top_mass, frames=canvas.frames,
                  frame_index=canvas.frame_index)
    kind = "Video dynamic kernels (Fig. 3)" if qa.grid3[0] > 1 else "Dynamic kernels"
    which = channel_text(qa)
    formula = ("kappa[j, c] = sum_d A[d, j] U^V[c, d]" if qa.channelwise else "kappa[j] = sum_d A[d, j] U^V[d]")
    fig.suptitle(f"{kind} - {query_label(qa)}\n{formula}{f' ({which})' if which else ''} over the "
                 f"{'x'.join(map(str, kappas.shape[1:]))} (t, h, w) window of each key; "
                 f"{reading_text(qa.normalize).split(':')[0]}", fontsize=9)
    return save_figure(fig, path, arrays)


# --------------------------------------------------------------------------- Fig. 4


def compare_figure(models, sample: torch.Tensor, path, *, block: int | None = None, query=None, head: int = 0) -> Path:
    """Fig. 4: the attention map of the same query in several models, side by side.

    Args:
        models: ``{label: model}`` (e.g. separately trained SA, ConvSA and StructSA
            models of one architecture), or one model, whose SA/ConvSA versions are
            derived with :func:`derive_variants`.
        block: attention block index, the same in every model (default: the structural
            block with the largest grid of the last model).

    Each map is the query's attention over the key grid summed over patterns (for SA the
    softmax itself), so all models show one distribution over keys; each has its own
    colour scale (SA maps are flatter). Video: one row per model, one column per frame.
    The ``.npz`` holds ``attention`` (models, T', H', W') (when the key grids differ, e.g.
    a strided StructSA next to SA, ``attention_0``, ``attention_1``, ... instead),
    ``labels``, ``kinds``, ``kv_strides`` and the query.
    """
    plt = pyplot()
    if isinstance(models, nn.Module):
        models = derive_variants(models)
    if not isinstance(models, Mapping) or not models:
        raise TypeError("models must be a non-empty {label: model} mapping or one model")
    labels = list(models)
    last = models[labels[-1]]
    x = prepare_sample(last, sample)
    if block is None:
        block = default_block(capture(last, x)).index
    results = []
    for label in labels:
        m = models[label]
        n_layers = len(attention_layers(m))
        if not 0 <= block < n_layers:
            raise ValueError(f"block must be an attention block index in [0, {n_layers}) for model {label!r}, "
                             f"got {block}")
        results.append(query_attention(m, x, block, query, head))
    grids = {r.grid3 for r in results}
    if len(grids) != 1:
        raise ValueError(f"block {block} has different token grids in the models: {sorted(grids)}")
    qa0 = results[0]
    canvas = Canvas.make(x, qa0.grid3)
    T = qa0.grid3[0]
    maps = [r.mass() for r in results]  # each on its model's key grid (a strided layer has fewer keys)
    if T == 1:
        fig, axes = plt.subplots(1, len(labels) + 1, figsize=(2.6 * (len(labels) + 1), 3.2))
        canvas.show(axes[0])
        canvas.mark(axes[0], *qa0.query, label="q")
        axes[0].set_title("input and query", fontsize=9)
        for ax, label, r, mp in zip(axes[1:], labels, results, maps):
            im = canvas.show(ax, mp, vmin=float(mp.min()), vmax=float(mp.max()), kv_stride=r.kv_stride3)
            canvas.mark(ax, *r.query)
            ax.set_title(f"{label}\nmax {mp.max():.3f}", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    else:
        fig, axes = plt.subplots(len(labels), T, figsize=(2.3 * T, 2.3 * len(labels) + 0.4), squeeze=False)
        for row, (label, r, mp) in enumerate(zip(labels, results, maps)):
            key_frames = canvas.key_frames(r.kv_stride3, mp.shape[0])
            for t in range(T):
                ax = axes[row, t]
                if t in key_frames:
                    tk = key_frames.index(t)
                    im = canvas.show(ax, mp[tk:tk + 1], frames=[t], vmin=float(mp.min()), vmax=float(mp.max()),
                                     kv_stride=r.kv_stride3)
                else:  # a frame without keys (temporal key stride)
                    canvas.show(ax, frames=[t])
                canvas.mark(ax, *r.query, frames=[t])
                if row == 0:
                    ax.set_title(f"frame t={t}", fontsize=9)
                if t == 0:
                    ax.set_ylabel(label, fontsize=9)
            fig.colorbar(im, ax=axes[row, T - 1], fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    if len({mp.shape for mp in maps}) == 1:
        att = {"attention": np.stack(maps)}
    else:  # key grids differ between the models: one array each
        att = {f"attention_{i}": mp for i, mp in enumerate(maps)}
    arrays = common_arrays(qa0)
    arrays.update(att, labels=np.array(labels), kinds=np.array([r.capture.kind for r in results]),
                  kv_strides=np.array([r.kv_stride3 for r in results]), frames=canvas.frames,
                  frame_index=canvas.frame_index)
    for key in ("kind", "normalize", "patterns", "channel", "key_grid", "kv_stride"):
        del arrays[key]
    fig.suptitle(f"SA vs ConvSA vs StructSA (Fig. 4) - block {block}, head {qa0.head}, query "
                 f"{tuple(qa0.query if T > 1 else qa0.query[1:])}\nattention over keys, summed over patterns; "
                 f"each map on its own colour scale", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, arrays)


# --------------------------------------------------------------------------- readings


def readings_figure(model: nn.Module, sample: torch.Tensor, path, *, block: int | None = None, query=None,
                    head: int = 0) -> Path:
    """The two softmax readings of sigma_jD on the same scores of one query.

    Row 1, "joint": one distribution over all (d, j): the D maps share one colour scale
    and each title gives the pattern's share of the query's total attention (shares sum
    to 100 %). Row 2, "per_pattern": D distributions over j, each map summing to 1 and
    shown on its own colour scale. The block's own reading is marked. Needs a StructSA or
    ConvSA block. The ``.npz`` holds ``joint`` and ``per_pattern`` (D, T', H', W'), ``shares``.
    """
    plt = pyplot()
    x = prepare_sample(model, sample)
    caps = capture(model, x, None if block is None else [block])
    cap = default_block(caps) if block is None else caps[0]
    _require_structural(cap, model, "a readings plot")
    res = {r: query_attention(model, x, cap.index, query, head, r, captures=[cap]) for r in ("joint", "per_pattern")}
    qa = res["joint"]
    canvas = Canvas.make(x, qa.grid3)
    d, T = qa.num_patterns, qa.key_grid3[0]
    ncols = d if T == 1 else max(1, min(d, 8 // T))
    rows = math.ceil(d / ncols)
    strip_w = 1.9 if T == 1 else 1.5 * T  # a panel: one map, or a strip of T frames
    row_h = strip_w / max(T, 1) * canvas.height / canvas.width + 0.4
    fig = plt.figure(figsize=(strip_w * ncols + 0.8, row_h * 2 * rows + 0.9),
                     layout="constrained" if T == 1 else None)
    own = cap.module.normalize
    for sub, reading in zip(fig.subfigures(2, 1, hspace=0.04), ("joint", "per_pattern")):
        _pattern_maps(sub, sub.add_gridspec(1, 1)[0], qa, canvas, res[reading].head_weights(), reading, ncols)
        sub.suptitle(f"{reading}: " + reading_text(reading).split(": ", 1)[1]
                     + ("  [the block's own reading]" if reading == own else ""), fontsize=8, style="italic")
    arrays = common_arrays(qa)
    arrays.update(joint=res["joint"].head_weights(), per_pattern=res["per_pattern"].head_weights(),
                  shares=res["joint"].head_weights().reshape(d, -1).sum(1), frames=canvas.frames)
    arrays["normalize"] = np.array(own)
    fig.suptitle(f"Both readings of sigma_jD - {query_label(qa)}", fontsize=9, **({} if T == 1 else {"y": 1.02}))
    return save_figure(fig, path, arrays)


# --------------------------------------------------------------------------- all of them


def write_demo_figures(model: nn.Module, sample: torch.Tensor, out_dir, *, block: int | None = None, query=None,
                       head: int = 0, compare_models: Mapping[str, nn.Module] | None = None,
                       prefix: str | None = None, channel: int | None = None) -> list[Path]:
    """One of each figure for ``model`` on ``sample``; returns the PNG paths (each with a .npz).

    Files (``prefix`` default "image" or "video"): ``{prefix}_attention.png`` (Fig. 2),
    ``{prefix}_kernels.png`` (Fig. 3; for a video model the space-time kernels),
    ``{prefix}_compare.png`` (Fig. 4: ``compare_models`` if given, else the derived SA /
    ConvSA variants of ``model``) and ``{prefix}_readings.png`` (joint vs per_pattern).
    """
    out_dir = Path(out_dir)
    prefix = prefix or ("video" if getattr(model, "video", False) else "image")
    kw = dict(block=block, query=query, head=head)
    paths = [attention_figure(model, sample, out_dir / f"{prefix}_attention.png", channel=channel, **kw),
             kernels_figure(model, sample, out_dir / f"{prefix}_kernels.png", channel=channel, **kw),
             compare_figure(compare_models if compare_models is not None else model, sample,
                            out_dir / f"{prefix}_compare.png", **kw),
             readings_figure(model, sample, out_dir / f"{prefix}_readings.png", **kw)]
    return paths
