"""DeepNet / DeepNorm initialization (Wang et al. 2022, "DeepNet: Scaling Transformers to
1,000 Layers", arXiv:2203.00555) of a ``transformer_wskip*`` model (``--wskip-init deepnet``).

DeepNorm is the Post-LN sublayer x_{l+1} = LN(alpha * x_l + G(x_l)): the model's w_skip
vectors are set to alpha and frozen (``requires_grad=False``), alpha being a constant in
DeepNet, not a parameter. Then, in every layer of a stack,

    fc1, fc2, self_attn.v_proj, self_attn.out_proj    Xavier normal, gain beta
    (decoder also encoder_attn.v_proj, .out_proj: torchscale decoder.py lines 291-298
    select every parameter of the decoder by name, the encoder attention's included)
    q_proj, k_proj                                    Xavier normal, gain 1

with, for an encoder-decoder of N encoder and M decoder layers (the paper's Figure 2
pseudo-code and its table of constants):

    encoder  alpha = 0.81 (N^4 M)^(1/16)    beta = 0.87 (N^4 M)^(-1/16)
    decoder  alpha = (3M)^(1/4)             beta = (12M)^(-1/4)

Reference code: microsoft/torchscale at 4d1e0e8 (cited at each formula below). Where it
differs from the paper, the paper is followed:
- torchscale does not redraw the weights: it divides fairseq-style initial weights
  (Xavier uniform, gain 1/sqrt(2) on q/k/v; nn.Linear's default on fc1/fc2) by 1/beta.
  The paper's pseudo-code draws Xavier normal with gain beta; that is done here (the
  difference is discussed in torchscale issue #16).
- torchscale's encoder divides by (N^4 M)^(1/16) / 1.15 (encoder.py lines 236-241), i.e.
  beta = 1.15 (N^4 M)^(-1/16), not the paper's 0.87 (N^4 M)^(-1/16); the paper's 0.87 is
  used here.
Biases of the beta-scaled projections keep fairseq's initialization times beta
(torchscale divides every parameter of those modules, biases included); q/k biases,
embeddings and LayerNorms keep fairseq's initialization.

With GradInit: GradInit starts from these weights; the frozen alpha gets no GradInit
scale (``--gradinit-wskip`` is refused on a DeepNet model: there is nothing to scale).
"""
import logging
from typing import Dict, Tuple

import torch
from torch import nn

from .models.wskip_transformer import WSKIP_PREFIX, wskip_layers

#: Projections of an attention block that get gain beta (the others, q and k, gain 1).
BETA_ATTENTION = ("v_proj", "out_proj")
UNIT_ATTENTION = ("q_proj", "k_proj")


def deepnet_constants(encoder_layers: int, decoder_layers: int) -> Dict[str, Tuple[float, float]]:
    """DeepNorm's (alpha, beta) of an encoder-decoder, per stack.

    >>> c = deepnet_constants(6, 6)
    >>> [round(x, 4) for x in c["encoder"] + c["decoder"]]
    [1.4179, 0.497, 2.0598, 0.3433]
    """
    n, m = encoder_layers, decoder_layers
    if n < 1 or m < 1:
        raise ValueError(f"DeepNet needs an encoder and a decoder, got {n} and {m} layers")
    depth = (n**4 * m) ** (1 / 16)
    return {
        # torchscale encoder.py lines 78-85 (alpha = 0.81 (N^4 M)^(1/16)); beta: the
        # paper's 0.87 (N^4 M)^(-1/16) (torchscale lines 236-241 use 1.15, see above)
        "encoder": (0.81 * depth, 0.87 / depth),
        # torchscale decoder.py lines 89-91 (alpha) and 286-288 (beta = (12M)^(-1/4))
        "decoder": ((3 * m) ** 0.25, (12 * m) ** -0.25),
    }


def deepnet_initialize(model: nn.Module) -> nn.Module:
    """Apply DeepNorm to a ``transformer_wskip*`` encoder-decoder in place and return it."""
    layers = wskip_layers(model)
    stacks = {s: [l for l in layers if l.wskip_stack == s] for s in ("encoder", "decoder")}
    constants = deepnet_constants(len(stacks["encoder"]), len(stacks["decoder"]))
    with torch.no_grad():
        for stack, stack_layers in stacks.items():
            alpha, beta = constants[stack]
            for layer in stack_layers:
                for sub in layer.wskip_names:
                    w = getattr(layer, WSKIP_PREFIX + sub)
                    w.fill_(alpha)  # torchscale encoder.py line 114: residual * alpha + x
                    w.requires_grad_(False)
                for fc in (layer.fc1, layer.fc2):
                    _xavier_normal(fc, beta)
                for attention in (layer.self_attn, getattr(layer, "encoder_attn", None)):
                    if attention is None:
                        continue
                    for name in BETA_ATTENTION:
                        _xavier_normal(getattr(attention, name), beta)
                    for name in UNIT_ATTENTION:
                        _xavier_normal(getattr(attention, name), 1.0, scale_bias=False)
    logging.getLogger("fairseq_gradinit").info(
        "DeepNet init (--wskip-init deepnet): "
        + ", ".join(f"{stack} alpha={a:.4f} (fixed) beta={b:.4f}" for stack, (a, b) in constants.items())
    )
    return model


def _xavier_normal(linear: nn.Linear, gain: float, scale_bias: bool = True) -> None:
    nn.init.xavier_normal_(linear.weight, gain=gain)
    if scale_bias and linear.bias is not None:
        linear.bias.mul_(gain)
