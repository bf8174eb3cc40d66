"""Post-LN Transformer without any LayerNorm, for T-Fixup (Huang et al. 2020).

``transformer_tfixup`` is fairseq's ``transformer`` with every LayerNorm removed: none
in the layers (each sublayer computes ``x + f(x)``), none on the embeddings, none at the
end of a stack. fairseq's layers are reused unchanged; their LayerNorm modules are
replaced by identities when a layer is built (building a LayerNorm draws no random
numbers, so with the same seed every other tensor equals fairseq's ``transformer``).

``--tfixup-init tfixup`` (default) applies T-Fixup's initialization when the model is
built (``fairseq_gradinit.tfixup_init``); ``--tfixup-init default`` keeps fairseq's
ordinary initialization (for ablations: an LN-free Transformer usually diverges).
"""
from torch import nn

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerModel
from fairseq.models.transformer.transformer_legacy import base_architecture, transformer_iwslt_de_en
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase

from .layer_stacks import LayerClassDecoder, LayerClassEncoder, LayerClassModelMixin
from .wskip_transformer import NoFastPathMixin

TFIXUP_INITS = ("tfixup", "default")

#: Flags that would put a LayerNorm into the model.
_LAYERNORM_FLAGS = {
    "encoder_normalize_before": "--encoder-normalize-before",
    "decoder_normalize_before": "--decoder-normalize-before",
    "layernorm_embedding": "--layernorm-embedding",
}


def _drop_layernorms(layer, names):
    for name in names:
        if getattr(layer, name, None) is not None:
            setattr(layer, name, nn.Identity())


class NoLNTransformerEncoderLayer(NoFastPathMixin, TransformerEncoderLayerBase):
    def __init__(self, cfg, return_fc=False):
        super().__init__(cfg, return_fc=return_fc)
        _drop_layernorms(self, ("self_attn_layer_norm", "final_layer_norm"))


class NoLNTransformerDecoderLayer(TransformerDecoderLayerBase):
    def __init__(self, cfg, no_encoder_attn=False, add_bias_kv=False, add_zero_attn=False):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
        _drop_layernorms(self, ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"))


class NoLNTransformerEncoder(LayerClassEncoder):
    layer_class = NoLNTransformerEncoderLayer


class NoLNTransformerDecoder(LayerClassDecoder):
    layer_class = NoLNTransformerDecoderLayer


@register_model("transformer_tfixup")
class TFixupTransformerModel(LayerClassModelMixin, TransformerModel):
    """Post-LN Transformer without LayerNorm, T-Fixup initialization (``--tfixup-init``)."""

    encoder_class, decoder_class = NoLNTransformerEncoder, NoLNTransformerDecoder

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        parser.add_argument(
            "--tfixup-init", choices=TFIXUP_INITS,
            help="tfixup (default): T-Fixup's initialization (Xavier, depth-scaled "
            "embeddings, FFN, attention value and output projections); default: fairseq's "
            "ordinary initialization of the LayerNorm-free model (for ablations)",
        )  # fmt: skip

    @classmethod
    def build_model(cls, args, task):
        for key, flag in _LAYERNORM_FLAGS.items():
            if getattr(args, key, False):
                raise SystemExit(
                    f"fairseq-gradinit: error: {flag}: {args.arch} is a Transformer without "
                    "LayerNorm (T-Fixup); drop the flag, or use transformer or transformer_wskip"
                )
        args.tfixup_init = getattr(args, "tfixup_init", None) or "tfixup"
        model = super().build_model(args, task)
        left = [n for n, m in model.named_modules() if "LayerNorm" in type(m).__name__]
        if left:
            raise SystemExit(
                f"fairseq-gradinit: error: --arch {args.arch}: the model still has LayerNorm "
                f"modules ({', '.join(left[:3])}); a flag of this command adds them"
            )
        model.tfixup_init = args.tfixup_init
        if args.tfixup_init == "tfixup":
            # Part of building the model, whatever task builds it (tfixup_init sits above
            # the models, hence the import here).
            from ..tfixup_init import tfixup_initialize

            tfixup_initialize(model)
        return model


@register_model_architecture("transformer_tfixup", "transformer_tfixup")
def transformer_tfixup(args):
    args.tfixup_init = getattr(args, "tfixup_init", None) or "tfixup"
    base_architecture(args)


@register_model_architecture("transformer_tfixup", "transformer_tfixup_iwslt_de_en")
def transformer_tfixup_iwslt_de_en(args):
    args.tfixup_init = getattr(args, "tfixup_init", None) or "tfixup"
    transformer_iwslt_de_en(args)
