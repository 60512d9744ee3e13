"""The one check of a model name, used by every command and by the checkpoint reader.

A name is valid when it is registered with timm under exactly that name: the StructViT
family, the DeiT-style models and any timm architecture. Names that timm would resolve
to something else (a pretrained tag ``name.tag``, a hub id ``hf-hub:org/repo``, a path)
are refused, so a name never makes timm read a file or reach the network.
"""
from __future__ import annotations

__all__ = ["check_model_name", "project_model_names"]


def project_model_names() -> tuple[str, ...]:
    """The models this project registers: the StructViT family, the DeiT-style models, then
    the dense-prediction backbones."""
    from . import DEIT_MODEL_NAMES, DENSE_MODELS, MODEL_NAMES

    return tuple(dict.fromkeys(MODEL_NAMES + DEIT_MODEL_NAMES + tuple(DENSE_MODELS)))


def check_model_name(name, argument: str = "model") -> str:
    """``name`` if it is a registered model name, else ``ValueError`` naming ``argument``.

    Args:
        name: the model name to check, e.g. ``"structvit_tiny"`` or ``"structvit_deit_tiny"``.
        argument: how the caller calls the value in its message (``"--model"``, ``"MODEL"``).
    """
    import timm

    ours = project_model_names()
    if isinstance(name, str) and (name in ours or name in timm.list_models()):
        return name
    raise ValueError(f"{argument}: unknown model {name!r}; StructViT models: {', '.join(ours)} "
                     "(or any timm model name)")
