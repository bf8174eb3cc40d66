"""Admin's closed-form initialization of w_skip (``--wskip-init admin-analytic``).

admin-torch (microsoft/admin-torch, the authors' library; Liu et al. 2020) replaces the
profiling run of the original Admin by a constant that depends on the depth only:

    omega = sqrt( (K + 1) / ln(K + 1) - 1 )

for the default "O(log n)" output change (admin_torch/admin.py, ``calculate_init``,
lines 73-74 and 81 at commit 08b6605), where K is the number of residual sublayers of
the stack ("num_res_layers: the total number of residual layers. Typical n-layer
Transformer encoder has 2n residual layers", admin.py lines 63-64 and 125). Here K is
counted per stack from the model: 2N for an N-layer encoder (self-attention, FFN), 3M
for an M-layer decoder (self-attention, encoder attention, FFN). Every w_skip of a stack
gets that stack's omega.

w_skip stays a learnable vector, as ``as_module(..., as_parameter=True)`` (admin.py
lines 26-30) which the authors' fairseq recipes use (example/train_wmt_en-de.sh line 4,
``--encoder-as-parameter --decoder-as-parameter``).
"""
import logging
import math
from typing import Dict

import torch

from .models.wskip_transformer import WSKIP_PREFIX, wskip_layers


def admin_omega(num_res_layers: int) -> float:
    """Admin's closed-form omega for K residual sublayers.

    >>> round(admin_omega(12), 4)  # a 6-layer encoder
    2.017
    """
    if num_res_layers < 1:
        raise ValueError(f"admin_omega needs at least one residual sublayer, got {num_res_layers}")
    k1 = num_res_layers + 1
    return math.sqrt(k1 / math.log(k1) - 1)  # admin-torch admin.py lines 74, 81


def admin_analytic_initialize(model: torch.nn.Module) -> torch.nn.Module:
    """Fill every w_skip of a ``transformer_wskip*`` model with its stack's omega (in place;
    returns the model). 6 + 6 layers: encoder K = 12, omega 2.017; decoder K = 18, 2.335."""
    stacks: Dict[str, list] = {}
    for layer in wskip_layers(model):
        stacks.setdefault(layer.wskip_stack, []).append(layer)
    if not stacks:
        raise ValueError("the model has no w_skip layers")
    result = {}
    with torch.no_grad():
        for stack, layers in stacks.items():
            k = sum(len(layer.wskip_names) for layer in layers)
            omega = admin_omega(k)
            for layer in layers:
                for sub in layer.wskip_names:
                    getattr(layer, WSKIP_PREFIX + sub).fill_(omega)
            result[stack] = (k, omega)
    logging.getLogger("fairseq_gradinit").info(
        "Admin closed-form init (--wskip-init admin-analytic): "
        + ", ".join(f"{stack} K={k} omega={omega:.4f}" for stack, (k, omega) in result.items())
    )
    return model
