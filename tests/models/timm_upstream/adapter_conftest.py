"""Adapter that runs timm's own ``tests/test_models.py`` on this project's models only.

Not collected by our suite: ``tests/test_timm_upstream.py`` copies it, as ``conftest.py``,
next to a copy of timm's test file in a temporary folder and runs pytest there. Nothing of
timm's file is changed; this conftest is imported first and adapts what the file asks timm:

- ``timm.list_models`` answers with the project's names only (``STRUCTVIT_TIMM_MODELS``:
  comma-separated fnmatch patterns, default every ``structvit*`` name), ``list_pretrained``
  and ``list_models(pretrained=True)`` with none (no pretrained weights are downloaded);
- every test then runs on every selected name, except that timm's two cfg tests are split
  as timm splits its own families: the *standard* test (``pool_size``, (B, C, H, W)
  features) for the StructViT image models, the *non-standard* one (token features or
  more than two spatial axes) for the DeiT-style models, which are DeiTs (timm lists its
  own ``deit*`` there), and for the video models, whose maps are (B, C, T, H, W) where the
  standard test handles two spatial axes;
- timm's feature-shape tests, which read axes 2 and 3 of a map as (H, W), are left out for
  the video models (axis 2 is time there); our own ``tests/models/test_timm_contract.py`` checks
  their (T, H, W) maps;
- the video models (``num_frames`` in their cfg) get ``input_size`` (C, T, H, W), in the
  registry answer and in the built model's cfg (set after the build: timm's builder reads
  ``input_size`` as (C, H, W)), so each test feeds them a 5-D clip.
"""
from __future__ import annotations

import fnmatch
import os

import pytest
import timm

import structvit  # noqa: F401  (registers the models with timm)

_list_models = timm.list_models
_create_model = timm.create_model
_cfg_value = timm.get_pretrained_cfg_value

SELECTED = [p for p in os.environ.get("STRUCTVIT_TIMM_MODELS", "structvit*").split(",") if p]
NAMES = [n for n in _list_models("structvit*") if any(fnmatch.fnmatch(n, p) for p in SELECTED)]
VIDEO = {n for n in NAMES if _cfg_value(n, "num_frames")}
DEIT = {n for n in NAMES if n.startswith("structvit_deit_")}
NON_STANDARD = VIDEO | DEIT
# tests whose shape checks read axes 2 and 3 of every map as (H, W): a video map's axis 2 is
# time, so they cannot judge one (tests/test_timm_contract.py checks video maps' (T, H, W))
# the dense backbones (``*_h14`` / ``*_h32``) carry UniFormer's per-stage output norms, which only
# their feature maps (features_only, forward_intermediates) use: a classification forward leaves
# them without a gradient, so timm's all-parameters-get-a-gradient tests do not apply to them
# (tests/dense/test_dense_backbone.py runs a backward through their feature maps instead)
DENSE = {n for n in NAMES if n.endswith(("_h14", "_h32"))}
CLASSIFIER_BACKWARD = {"test_model_backward", "test_model_backward_fx"}
TWO_SPATIAL_AXES = {"test_model_forward_features", "test_model_forward_intermediates_features",
                    "test_model_forward_intermediates"}


def list_models(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False,
                include_tags=None):
    """The selected project names (none with pretrained weights: the project publishes none)."""
    return [] if pretrained else list(NAMES)


def list_pretrained(filter="", exclude_filters=""):
    return []


def _clip_size(name):
    c, h, w = _cfg_value(name, "input_size")
    return (c, _cfg_value(name, "num_frames"), h, w)


def get_pretrained_cfg_value(model_name, cfg_key):
    if cfg_key == "input_size" and model_name in VIDEO:
        return _clip_size(model_name)
    return _cfg_value(model_name, cfg_key)


def create_model(model_name, *args, **kwargs):
    model = _create_model(model_name, *args, **kwargs)
    if model_name in VIDEO:  # after the build: timm's builder reads input_size as (C, H, W)
        cfg = {**model.pretrained_cfg, "input_size": _clip_size(model_name)}
        model.pretrained_cfg = cfg
        if hasattr(model, "default_cfg"):
            model.default_cfg = cfg
    return model


# timm's test file imports these names from timm when it is collected, after this conftest
timm.list_models, timm.list_pretrained = list_models, list_pretrained
timm.create_model, timm.get_pretrained_cfg_value = create_model, get_pretrained_cfg_value


def pytest_collection_modifyitems(config, items):
    """Each cfg test on its side of timm's standard / non-standard split (see the module
    docstring); tests of timm's own models (naflexvit, regnetx_002, ...) left out."""
    keep, drop = [], []
    for item in items:
        name = item.callspec.params.get("model_name") if hasattr(item, "callspec") else None
        test = item.originalname if hasattr(item, "originalname") else item.name
        wrong_side = ((test == "test_model_default_cfgs" and name in NON_STANDARD)
                      or (test == "test_model_default_cfgs_non_std" and name not in NON_STANDARD)
                      or (test in TWO_SPATIAL_AXES and name in VIDEO)
                      or (test in CLASSIFIER_BACKWARD and name in DENSE))
        # tests without a model_name, or with one of timm's names, are about timm's own models
        (drop if wrong_side or name not in NAMES else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the machine's cores are shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
