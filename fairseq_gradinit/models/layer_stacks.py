"""fairseq's Transformer built from layer classes of our own.

fairseq builds each layer in ``TransformerEncoder.build_encoder_layer`` and
``TransformerDecoder.build_decoder_layer``; these subclasses build ``layer_class``
instead, wrapped as fairseq wraps its own (activation checkpointing, FSDP).

Example::

    class MyEncoder(LayerClassEncoder):
        layer_class = MyEncoderLayer

    class MyModel(LayerClassModelMixin, TransformerModel):
        encoder_class, decoder_class = MyEncoder, MyDecoder
"""
from fairseq.distributed import fsdp_wrap
from fairseq.models.transformer import TransformerConfig, TransformerDecoder, TransformerEncoder
from fairseq.modules.checkpoint_activations import checkpoint_wrapper


def _wrap(layer, cfg):
    """fairseq's build_*_layer wrapping: activation checkpointing, FSDP."""
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not checkpoint else 0)


class LayerClassEncoder(TransformerEncoder):
    """fairseq's encoder whose layers are ``layer_class`` (set by a subclass)."""

    layer_class = None

    def build_encoder_layer(self, args):
        cfg = TransformerConfig.from_namespace(args)
        return _wrap(self.layer_class(cfg, return_fc=self.return_fc), cfg)


class LayerClassDecoder(TransformerDecoder):
    """fairseq's decoder whose layers are ``layer_class`` (set by a subclass)."""

    layer_class = None

    def build_decoder_layer(self, args, no_encoder_attn=False):
        cfg = TransformerConfig.from_namespace(args)
        return _wrap(self.layer_class(cfg, no_encoder_attn), cfg)


class LayerClassModelMixin:
    """For a ``TransformerModel`` subclass: builds ``encoder_class`` and ``decoder_class``."""

    encoder_class = decoder_class = None

    @classmethod
    def build_encoder(cls, args, src_dict, embed_tokens):
        return cls.encoder_class(args, src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        return cls.decoder_class(
            args, tgt_dict, embed_tokens, no_encoder_attn=getattr(args, "no_cross_attention", False)
        )
