"""The weights of a model in training: scaling them where fairseq keeps them, fp32 copies.

Shared by GradInit (hook.py) and Admin (admin_init.py): both compute on an fp32 model
and write their result into the model and into an fp16 optimizer's fp32 master copy.
"""
import copy
from typing import Dict

import torch

from .core import apply_scales


def scale_training_weights(model, optimizer, scales: Dict[str, float]) -> None:
    """Multiply named tensors of a model in training by their scales, in place.

    With fairseq's FP16Optimizer the fp32 master copy it steps from is scaled too (and
    the fp16 weights copied from it), so both hold exactly scale x initial value.
    """
    params = dict(model.named_parameters())
    fp16_params = getattr(optimizer, "fp16_params", None)
    master = getattr(optimizer, "fp32_params", None)
    if fp16_params is None or master is None:
        apply_scales(model, scales)
        return
    scale_of = {id(params[n]): s for n, s in scales.items()}
    with torch.no_grad():
        for p, p32 in zip(fp16_params, _master_views(fp16_params, master)):
            if id(p) in scale_of:
                p32.mul_(torch.tensor(scale_of[id(p)], dtype=torch.float32))
                p.copy_(p32.view_as(p))


def _master_views(fp16_params, master):
    """The fp32 master tensor of each fp16 parameter, as fairseq's FP16Optimizer lays it out.

    Flat masters are one tensor per device, keyed by CUDA device index (one key unless
    pipeline-parallel), holding the parameters back to back in ``fp16_params`` order.
    """
    if isinstance(master, (list, tuple)):
        return [p32.data for p32 in master]
    if torch.is_tensor(master):
        master = {None: master}
    single = len(master) == 1
    offsets = dict.fromkeys(master, 0)
    views = []
    for p in fp16_params:
        key = next(iter(master)) if single else p.device.index
        offset = offsets[key]
        views.append(master[key].data[offset : offset + p.numel()])
        offsets[key] = offset + p.numel()
    return views


def fp32_model(model):
    """The model itself if it is fp32, else an fp32 copy: GradInit and Admin's profiling
    compute in fp32 whatever precision training uses."""
    if all(p.dtype == torch.float32 for p in model.parameters()):
        return model
    return copy.deepcopy(model).float()
