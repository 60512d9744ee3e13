"""Drawing helpers shared by the figures: matplotlib without a display, the input frames
aligned with a token grid (:class:`Canvas`), kernels as annotated heat maps, and saving a
figure with the numbers behind it (PNG + ``.npz``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

def pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo"):
        try:
            matplotlib.use("Agg")
        except Exception:  # pragma: no cover - an interactive backend already in use
            pass
    import matplotlib.pyplot as plt

    return plt


def display_frames(x: torch.Tensor) -> np.ndarray:
    """(1, C, [T,] H, W) normalised input -> (T, H, W, 3) in [0, 1] (min-max over the clip)."""
    a = x[0].detach().float().cpu()
    if a.dim() == 3:
        a = a.unsqueeze(1)
    a = a.permute(1, 2, 3, 0).numpy()  # (T, H, W, C)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, -1)
    a = a[..., :3]
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def cell_stride(size: int, cells: int) -> float:
    """Pixels (frames) per token along one axis: the power of two s with size // s == cells."""
    s = 1
    while s <= size:
        if size // s == cells:
            return s
        s *= 2
    return size / cells


@dataclass
class Canvas:
    """Input frames aligned with a (T, H, W) token grid, laid out as one horizontal strip."""

    frames: np.ndarray  # (T, Hc, Wc, 3), one per grid time step, cropped to the tokens' extent
    grid: tuple[int, int, int]
    sh: float
    sw: float
    frame_index: np.ndarray  # input frame shown for each grid time step

    @classmethod
    def make(cls, x: torch.Tensor, grid3) -> "Canvas":
        disp = display_frames(x)
        tin, h, w = disp.shape[:3]
        T, gh, gw = grid3
        st, sh, sw = cell_stride(tin, T), cell_stride(h, gh), cell_stride(w, gw)
        idx = np.minimum((np.arange(T) * st).astype(int), tin - 1)
        hc, wc = int(round(gh * sh)), int(round(gw * sw))
        return cls(disp[idx, :hc, :wc], tuple(grid3), sh, sw, idx)

    @property
    def height(self) -> int:
        return self.frames.shape[1]

    @property
    def width(self) -> int:
        return self.frames.shape[2]

    def strip(self, frames: Sequence[int] | None = None) -> np.ndarray:
        sel = range(self.grid[0]) if frames is None else frames
        return np.concatenate([self.frames[t] for t in sel], axis=1)

    def cell(self, t: int, h: int, w: int, frame_slot: int | None = None) -> tuple[float, float]:
        """Centre (x, y) of a token in strip coordinates."""
        slot = t if frame_slot is None else frame_slot
        return slot * self.width + (w + 0.5) * self.sw, (h + 0.5) * self.sh

    def key_frames(self, kv_stride=(1, 1, 1), count: int | None = None) -> list[int]:
        """The grid time steps of the key frames 0..count-1 at temporal stride kv_stride[0]."""
        st = kv_stride[0]
        count = -(-self.grid[0] // st) if count is None else count
        return [t * st for t in range(count)]

    def show(self, ax, heat: np.ndarray | None = None, frames: Sequence[int] | None = None, vmin=None, vmax=None,
             cmap="magma", alpha=0.75, kv_stride=(1, 1, 1)):
        """Frames (a strip) with an optional (T', H', W') key map on top; returns the heat image.

        ``heat`` lies on the key grid of stride ``kv_stride`` (st, sh, sw): key (h', w') is a
        cell of sh x sw tokens centred on token (sh h', sw w'), clipped to its frame; its
        frames are the grid time steps ``frames`` (default: every st-th).
        """
        if frames is None:
            frames = self.key_frames(kv_stride, heat.shape[0]) if heat is not None and heat.ndim == 3 else None
        sel = list(range(self.grid[0]) if frames is None else frames)
        ax.imshow(self.strip(sel), extent=(0, len(sel) * self.width, self.height, 0), interpolation="nearest")
        im = None
        if heat is not None:
            maps = heat if heat.ndim == 3 else heat[None]
            _, sh, sw = kv_stride
            hk, wk = maps.shape[1:]
            for slot, m in enumerate(maps[:len(sel)]):
                x0 = slot * self.width - (sw - 1) / 2 * self.sw
                y0 = -(sh - 1) / 2 * self.sh
                im = ax.imshow(m, extent=(x0, x0 + wk * sw * self.sw, y0 + hk * sh * self.sh, y0), cmap=cmap,
                               alpha=alpha, vmin=vmin, vmax=vmax, interpolation="nearest")
                im.set_clip_path(pyplot().Rectangle((slot * self.width, 0), self.width, self.height,
                                                  transform=ax.transData))
        for k in range(1, len(sel)):
            ax.axvline(k * self.width, color="white", lw=1.5)
        ax.set_xlim(0, len(sel) * self.width)
        ax.set_ylim(self.height, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        return im

    def mark(self, ax, t, h, w, frames: Sequence[int] | None = None, color="cyan", label=None, marker="s"):
        """Mark token (t, h, w) of the grid (a key: its position on the grid, see ``QueryAttention.key_position``)."""
        sel = list(range(self.grid[0]) if frames is None else frames)
        if t not in sel:
            return
        x, y = self.cell(t, h, w, sel.index(t))
        ax.plot([x], [y], marker=marker, ms=9, mfc="none", mec=color, mew=2)
        if label is not None:
            ax.text(x + 0.5 * self.sw, y - 0.5 * self.sh, label, color=color, fontsize=8, fontweight="bold",
                    ha="left", va="bottom")


def save_figure(fig, path, arrays: dict) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    np.savez(path.with_suffix(".npz"), **arrays)
    return path


def kernel_strip(u: np.ndarray) -> np.ndarray:
    """(kt, kh, kw) -> (kh, kt * (kw + 1) - 1) with NaN gaps between temporal slices."""
    kt, kh, kw = u.shape
    if kt == 1:
        return u[0]
    out = np.full((kh, kt * (kw + 1) - 1), np.nan)
    for t in range(kt):
        out[:, t * (kw + 1): t * (kw + 1) + kw] = u[t]
    return out


def kernel_unit(vmax: float) -> float:
    """Power of ten the annotations of small kernels are written in (1 if vmax >= 0.1)."""
    if not vmax > 0 or vmax >= 0.1:
        return 1.0
    return 10.0 ** math.floor(math.log10(vmax))


def unit_text(unit: float) -> str:
    return "" if unit == 1.0 else f" (x1e{int(round(math.log10(unit)))})"


def show_kernel(ax, u: np.ndarray, vmax: float, annotate: bool = True, cmap="RdBu_r", unit: float = 1.0,
                 signed: bool = True):
    """A (kt, kh, kw) kernel as a strip; ``signed``: colour scale [-vmax, vmax], else [0, vmax]."""
    strip = kernel_strip(u)
    cm = pyplot().get_cmap(cmap).with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(strip), cmap=cm, vmin=-vmax if signed else 0.0, vmax=vmax,
                   interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    kt, kh, kw = u.shape
    if annotate and kh * kw <= 25:
        fs = 7 if kh * kw <= 9 else 5
        for t in range(kt):
            for i in range(kh):
                for j in range(kw):
                    val = u[t, i, j]
                    ax.text(t * (kw + 1) + j, i, f"{val / unit:.2f}" if unit == 1.0 else f"{val / unit:.1f}", ha="center", va="center", fontsize=fs,
                            color="white" if abs(val) > 0.6 * vmax else "black")
    return im


