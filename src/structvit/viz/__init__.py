"""Analysis and visualisation: the paper's figures from any StructViT model or checkpoint.

Python API::

    from structvit.viz import write_demo_figures, attention_figure, kernels_figure, compare_figure
    paths = write_demo_figures(model, sample, "figures/")   # one of each, PNG + .npz

Modules: :mod:`.capture` (a block's attention input, captured by a hook), :mod:`.query` (one
query's attention weights recomputed from it), :mod:`.canvas` (drawing helpers),
:mod:`.variants` (SA / ConvSA versions of a model for the comparison), :mod:`.figures` (the
figures themselves).

Command line: ``structvit viz attention|kernels|compare|readings|demo --help``.
"""
from .capture import AttentionCapture, attention_layers, attention_weights, capture, layer_kind, parse_query, query_index
from .figures import attention_figure, compare_figure, kernels_figure, readings_figure, write_demo_figures
from .query import QueryAttention, prepare_sample, query_attention
from .variants import derive_variants

__all__ = [
    "AttentionCapture", "attention_layers", "attention_weights", "capture", "layer_kind", "parse_query", "query_index",
    "QueryAttention", "attention_figure", "compare_figure", "derive_variants", "kernels_figure", "prepare_sample",
    "query_attention", "readings_figure", "write_demo_figures",
]
