"""Which parameter tensors GradInit gives a scale to.

Imports torch only. Selection is by module, not by parameter name: fairseq's layers can
carry unused, zero-filled tensors with names like ``in_proj_weight`` that a name filter
would pick up by mistake, and a module rule works on any model.

The rule, for every module of the model (the paper's "parameterized linear operations",
section 3 and its footnote 1, including "the scale and bias of normalization layers"):

* linear maps: ``nn.Linear``, ``nn.Embedding``, ``nn.Conv*``, fairseq's ``ConvTBC`` (and
  its subclass ``LinearizedConvolution``, used by ``--arch fconv``), and the packed
  projections of ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``,
  ``q/k/v_proj_weight``, ``bias_k/bias_v``; its ``out_proj`` is an ``nn.Linear``). The
  packed ``in_proj_weight`` holds q, k and v in one tensor and gets ONE scale: splitting
  it would need a scale per slice, which the weight could not store (the model keeps one
  tensor). fairseq's own attention has separate q/k/v ``nn.Linear`` and gets three.
* normalization layers, however implemented: a module whose class, or any base class,
  is named ``*LayerNorm``, ``*RMSNorm``, ``*GroupNorm``, ``*BatchNorm[123]d``,
  ``*InstanceNorm[123]d`` or ``*SyncBatchNorm``. The name is the only thing the
  implementations share: apex's ``FusedLayerNorm`` and ``FusedRMSNorm`` (which fairseq
  builds whenever CUDA and apex are present), Megatron's ``MixedFusedLayerNorm``,
  ``nn.RMSNorm``, Hugging Face's ``LlamaRMSNorm``/``T5LayerNorm`` are plain
  ``nn.Module`` subclasses with a per-feature gain (and bias).
* weight normalization (``nn.utils.weight_norm`` and
  ``nn.utils.parametrizations.weight_norm``, used by fconv): the magnitude ``g`` is
  scaled, never the direction ``v`` (w = g v / ||v||, so a scale on v changes nothing).

Tensors that are all zeros or frozen are skipped (a scale on them changes nothing or is
not wanted). ``unscaled_modules`` lists what the rule left out, for a warning.
"""
import re
from typing import Dict, Iterable, List, Tuple, Type

import torch
from torch import nn

#: Module types whose own parameters get a scale (besides the normalization layers,
#: found by class name, see ``is_normalization``).
SCALED_MODULE_TYPES: Tuple[Type[nn.Module], ...] = (
    nn.Linear,
    nn.Embedding,
    nn.modules.conv._ConvNd,
    nn.MultiheadAttention,
    nn.LayerNorm,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
)

#: Class names (of the module's class or any base) of layers whose own parameters get a
#: scale whatever library they come from.
SCALED_CLASS_NAME = re.compile(
    r"(LayerNorm|RMSNorm|GroupNorm|BatchNorm([123]d)?|InstanceNorm[123]d|ConvTBC)$"
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
        module_types: the module classes whose direct parameters are scaled, besides
            those whose class name marks them as normalization layers or ConvTBC (see
            the module docstring).
        extra_names: further parameter names to scale whatever module owns them (for
            example Admin-style ``w_skip`` vectors).

    Returns:
        ``{name: "weight" | "bias"}`` in model order. "bias" for tensors whose own name
        is ``bias`` or ends in ``_bias`` (kept >= 0 by GradInit); everything else is a
        "weight" (kept >= the minimum scale).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> select_tensors(net)
        {'0.weight': 'weight', '0.bias': 'bias', '2.weight': 'weight', '2.bias': 'bias'}
    """
    module_types = tuple(module_types)
    canonical = {id(p): name for name, p in model.named_parameters()}
    wanted = {}
    for module in model.modules():
        if isinstance(module, module_types) or _scaled_by_class_name(module):
            for local_name, p in _own_scalable(module):
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
        local = wanted[id(p)]
        selected[name] = BIAS if local == "bias" or local.endswith("_bias") else WEIGHT
    return selected


def unscaled_modules(model: nn.Module, selected: Iterable[str], ignore: Iterable[str] = ()) -> List[str]:
    """Modules that own trainable, non-zero parameters none of which got a scale.

    Such a module takes part in GradInit (its gradient counts in the norm) but keeps its
    initialization: usually a layer type the selection rule does not know. Parameters
    named in ``ignore`` (say, w_skip vectors left out on purpose) do not count.

    Example:
        >>> class Gain(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.g = nn.Parameter(torch.ones(4))
        >>> net = nn.Sequential(nn.Linear(4, 4), Gain())
        >>> unscaled_modules(net, select_tensors(net))
        ['1 (Gain: g)']
    """
    chosen = {id(model.get_parameter(n)) for n in selected}
    ignored = {id(model.get_parameter(n)) for n in ignore}
    missed = []
    seen = set()
    for module_name, module in model.named_modules():
        own = [
            (local, p)
            for local, p in module.named_parameters(recurse=False)
            if p.requires_grad and id(p) not in ignored and id(p) not in seen and not _is_all_zero(p)
        ]
        seen.update(id(p) for _, p in module.named_parameters(recurse=False))
        if not own or any(id(p) in chosen for _, p in _all_own(module)):
            continue
        label = module_name or "(the model itself)"
        missed.append(f"{label} ({type(module).__name__}: {', '.join(local for local, _ in own)})")
    return missed


def _scaled_by_class_name(module: nn.Module) -> bool:
    return any(SCALED_CLASS_NAME.search(cls.__name__) for cls in type(module).__mro__)


def _own_scalable(module: nn.Module):
    """The module's direct parameters that a scale acts on: weight-norm directions are
    left out, and a weight-norm parametrization's magnitude is taken in."""
    directions = _weight_norm_directions(module)
    for local_name, p in module.named_parameters(recurse=False):
        if local_name not in directions:
            yield local_name, p
    # nn.utils.parametrizations.weight_norm keeps g and v as original0 and original1 of
    # module.parametrizations.<name>; other parametrizations (orthogonal, spectral) map
    # their tensors so that a scale on them means nothing definite: left unscaled.
    for tensor_name, plist in getattr(module, "parametrizations", {}).items():
        if any(type(p).__name__ == "_WeightNorm" for p in plist) and hasattr(plist, "original0"):
            yield tensor_name, plist.original0


def _all_own(module: nn.Module):
    yield from module.named_parameters(recurse=False)
    yield from _own_scalable(module)


def _weight_norm_directions(module: nn.Module) -> set:
    """Names of the direction tensors (``<name>_v``) of old-style ``nn.utils.weight_norm``."""
    from torch.nn.utils.weight_norm import WeightNorm

    return {hook.name + "_v" for hook in module._forward_pre_hooks.values() if isinstance(hook, WeightNorm)}


def _is_all_zero(p: torch.Tensor) -> bool:
    return p.numel() == 0 or not bool(p.detach().ne(0).any())
