"""Which parameter tensors GradInit gives a scale to.

Imports torch only. Selection is by module type, not by name: fairseq's layers carry
unused, zero-filled tensors with names like ``in_proj_weight`` that a name filter would
pick up by mistake, and a module-type rule works on any model.
"""
from typing import Dict, Iterable, Tuple, Type

import torch
from torch import nn

#: Module types whose own parameters get a scale: linear maps (attention q/k/v/out
#: projections, FFN fc1/fc2, output projections), normalization layers and embeddings.
SCALED_MODULE_TYPES: Tuple[Type[nn.Module], ...] = (
    nn.Linear,
    nn.LayerNorm,
    nn.Embedding,
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
)

WEIGHT = "weight"
BIAS = "bias"


def select_tensors(
    model: nn.Module,
    module_types: Iterable[Type[nn.Module]] = SCALED_MODULE_TYPES,
    extra_names: Iterable[str] = (),
) -> Dict[str, str]:
    """Pick the tensors of ``model`` that get one GradInit scale each.

    A tensor shared by several modules (tied embeddings, a tied output projection)
    appears once, under the name ``model.named_parameters()`` gives it. Tensors that are
    all zeros (zero-initialised biases, unused placeholders) are skipped: a scale on
    them changes nothing. Frozen tensors (``requires_grad=False``) are skipped too.

    Args:
        model: any module.
        module_types: the module classes whose direct parameters are scaled.
        extra_names: further parameter names to scale whatever module owns them (for
            example Admin-style ``w_skip`` vectors).

    Returns:
        ``{name: "weight" | "bias"}`` in model order. "bias" for tensors whose own name
        is ``bias`` (kept >= 0 by GradInit); everything else is a "weight" (kept >= the
        minimum scale).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> select_tensors(net)
        {'0.weight': 'weight', '0.bias': 'bias', '2.weight': 'weight', '2.bias': 'bias'}
    """
    module_types = tuple(module_types)
    canonical = {id(p): name for name, p in model.named_parameters()}
    wanted = {}
    for module in model.modules():
        if isinstance(module, module_types):
            for local_name, p in module.named_parameters(recurse=False):
                wanted.setdefault(id(p), local_name)
    extra = set(extra_names)
    for name, p in model.named_parameters():
        if name in extra:
            wanted.setdefault(id(p), name.rsplit(".", 1)[-1])
    missing = extra - set(canonical.values())
    if missing:
        raise ValueError(f"no parameter named {sorted(missing)} in the model")

    selected = {}
    for name, p in model.named_parameters():  # model order, shared tensors once
        if id(p) not in wanted or not p.requires_grad or _is_all_zero(p):
            continue
        selected[name] = BIAS if wanted[id(p)] == "bias" else WEIGHT
    return selected


def _is_all_zero(p: torch.Tensor) -> bool:
    return p.numel() == 0 or not bool(p.detach().ne(0).any())
