"""Tables 8 and 9: parameters and GFLOPs of the whole detectors / segmenters, counted on the meta
device, pinned against the paper's (structvit.dense.flops).

Tolerances: parameters within 0.6M of the published ones (the paper rounds to 1M); GFLOPs of
the UniFormer rows within 2% of the published; the StructViT Semantic FPN rows as counted are
pinned to our own count (1%) and their paper-convention estimate within 2% of the published.
The S rows run in the fast suite, the B rows (larger models to build) are marked slow."""
from __future__ import annotations

import pytest

from structvit.dense.flops import DENSE_ROWS, count_row, dense_markdown

# our counts (GMACs) of the StructViT Semantic FPN rows at 512 x 2048, as built (hybrid h32)
COUNTED = {"StructViT-S-4-1 h32": 321.5, "StructViT-B-4-1 h32": 655.5}


def _row(label):
    return next(r for r in DENSE_ROWS if r.label == label)


def _check(result):
    assert abs(result["params"] - result["paper_params"]) < 0.6, result
    if result["paper_gflops"] is None:
        assert result["gflops"] > 0  # Mask R-CNN: backbone + FPN only, nothing published
        return
    if result["paper_estimate"] is None:  # UniFormer rows
        assert abs(result["gflops_diff"]) < 0.02, result
    else:
        assert result["gflops"] == pytest.approx(COUNTED[result["label"]], rel=0.01)
        assert abs(result["estimate_diff"]) < 0.02, result


@pytest.mark.parametrize("label", [r.label for r in DENSE_ROWS if "-S" in r.label])
def test_small_rows(label):
    _check(count_row(_row(label)))


@pytest.mark.slow
@pytest.mark.parametrize("label", [r.label for r in DENSE_ROWS if "-B" in r.label])
def test_base_rows(label):
    _check(count_row(_row(label)))


def test_markdown_states_the_convention():
    results = [count_row(_row("UniFormer-S h32"))]
    text = dense_markdown(results)
    assert "FlopCounterMode" in text and "by hand" in text
    assert "| UniFormer-S h32 | Table 9 | structvit_s_4_1_h32 (struct_blocks=(0, 0)) | 512 x 2048 |" in text
