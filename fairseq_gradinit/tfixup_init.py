"""T-Fixup initialization (Huang et al. 2020, "Improving Transformer Optimization Through
Better Initialization", ICML) of a ``transformer_tfixup*`` model (no LayerNorm).

For N encoder and M decoder layers, following the authors' fairseq code
(layer6ai-labs/T-Fixup at b17e166, cited at each formula below):

    encoder fc1, fc2, self_attn.out_proj, self_attn.v_proj      x 0.67 N^(-1/4)
    decoder fc1, fc2, self_attn/encoder_attn out_proj, v_proj    x (9M)^(-1/4)
    encoder token embedding                                      x (9N)^(-1/4)
    decoder token embedding (unless shared with the encoder)     x (9M)^(-1/4)

on top of Xavier-uniform projections (gain 1) and N(0, d^(-1/2)) token embeddings.

Details, as the authors' code has them:
- The scaled matrices are Xavier uniform with gain 1 before scaling. fairseq draws v_proj
  with gain 1/sqrt(2) (the authors' fairseq/modules/multihead_attention.py lines 86-91),
  which the authors multiply by sqrt(2) (transformer_layer.py lines 43-44, 169-170); here
  v_proj is drawn afresh as Xavier uniform with gain = the factor: the same distribution,
  also where fairseq's gain is already 1 (key/value size other than the model's), where
  the authors' sqrt(2) would overshoot.
  out_proj, Xavier uniform with gain 1 in fairseq too, is multiplied by the factor.
- fc1/fc2 are drawn afresh the same way, with zero bias, as the authors' fairseq built
  them (fairseq/modules/transformer_layer.py lines 371-376); fairseq 0.12 uses
  nn.Linear's default there, which is not Xavier.
- q_proj, k_proj keep fairseq's Xavier uniform with gain 1/sqrt(2) (the authors do not
  touch them); q/k/v biases keep fairseq's initialization.
- The embeddings keep fairseq's sqrt(d) embedding scale in the forward pass.
- Encoder embedding: the paper scales both input embeddings by (9M)^(-1/4); the authors'
  code scales the encoder's by (9N)^(-1/4) (fairseq/models/transformer.py lines 378-381)
  and the decoder's by (9M)^(-1/4) only if it is not the encoder's (lines 604-607). The
  code is followed here (the two agree when N = M). With --share-all-embeddings the one
  shared table is scaled once, by (9N)^(-1/4); with --share-decoder-input-output-embed the
  output projection is the (scaled) decoder embedding; otherwise fairseq's output
  projection, N(0, d^(-1/2)), is kept (as the authors' embed_out).

With GradInit: GradInit starts from these weights. The model has no LayerNorm, so
GradInit scales only linear maps and embeddings.
"""
import logging
from typing import Dict

import torch
from torch import nn

from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase


def tfixup_factors(encoder_layers: int, decoder_layers: int) -> Dict[str, float]:
    """T-Fixup's scale factors.

    >>> {k: round(v, 4) for k, v in tfixup_factors(6, 6).items()}
    {'encoder': 0.4281, 'decoder': 0.3689, 'encoder_embedding': 0.3689, 'decoder_embedding': 0.3689}
    """
    n, m = encoder_layers, decoder_layers
    if n < 1 or m < 1:
        raise ValueError(f"T-Fixup needs an encoder and a decoder, got {n} and {m} layers")
    return {
        "encoder": 0.67 * n**-0.25,  # T-Fixup transformer_layer.py lines 37-44
        "decoder": (9 * m) ** -0.25,  # T-Fixup transformer_layer.py lines 161-170
        "encoder_embedding": (9 * n) ** -0.25,  # T-Fixup transformer.py lines 378-381
        "decoder_embedding": (9 * m) ** -0.25,  # T-Fixup transformer.py lines 604-607
    }


def tfixup_initialize(model: nn.Module) -> nn.Module:
    """Apply T-Fixup to a fairseq encoder-decoder Transformer in place and return it."""
    encoder_layers = _layers(model.encoder, TransformerEncoderLayerBase)
    decoder_layers = _layers(model.decoder, TransformerDecoderLayerBase)
    factors = tfixup_factors(len(encoder_layers), len(decoder_layers))
    with torch.no_grad():
        for layers, factor in ((encoder_layers, factors["encoder"]), (decoder_layers, factors["decoder"])):
            for layer in layers:
                for fc in (layer.fc1, layer.fc2):
                    nn.init.xavier_uniform_(fc.weight, gain=factor)
                    if fc.bias is not None:
                        fc.bias.zero_()
                for attention in (layer.self_attn, getattr(layer, "encoder_attn", None)):
                    if attention is not None:
                        # out_proj is already Xavier uniform, gain 1; v_proj has fairseq's
                        # 1/sqrt(2) (the authors multiply it by sqrt(2)): draw it afresh.
                        attention.out_proj.weight.mul_(factor)
                        nn.init.xavier_uniform_(attention.v_proj.weight, gain=factor)
        encoder_embedding = model.encoder.embed_tokens.weight
        encoder_embedding.mul_(factors["encoder_embedding"])
        decoder_embedding = model.decoder.embed_tokens.weight
        if decoder_embedding is not encoder_embedding:
            decoder_embedding.mul_(factors["decoder_embedding"])
    logging.getLogger("fairseq_gradinit").info(
        f"T-Fixup init (N={len(encoder_layers)}, M={len(decoder_layers)}): "
        + ", ".join(f"{name} x{factor:.4f}" for name, factor in factors.items())
    )
    return model


def _layers(stack: nn.Module, kind):
    layers = [m for m in stack.modules() if isinstance(m, kind)]
    if not layers:
        raise ValueError(f"T-Fixup: no {kind.__name__} in {type(stack).__name__}")
    return layers
