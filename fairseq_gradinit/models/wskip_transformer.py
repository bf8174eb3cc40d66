"""Post-LN Transformer with a learnable skip weight on every residual connection.

Every sublayer (encoder: self-attention, FFN; decoder: self-attention, encoder
attention, FFN) computes ``LayerNorm(w_skip * x + f(x))`` with ``w_skip`` a vector of
size embed_dim, one per sublayer: the parametrisation of Admin (Liu et al. 2020,
"Understanding the Difficulty of Training Transformers"). With every ``w_skip = 1`` the
model computes exactly what fairseq's ``transformer`` computes.

fairseq's layers are reused unchanged through their ``residual_connection(x, residual)``
hook; only that hook is replaced. See ``--wskip-init`` for how w_skip starts:
``ones``; ``admin``, Admin's profiling initialization, run by the plugin before the first
update (``fairseq_gradinit.admin_init``); ``admin-analytic``, Admin's closed form
(``fairseq_gradinit.admin_analytic_init``); ``deepnet``, DeepNorm's constant alpha and
beta-scaled weights (``fairseq_gradinit.deepnet_init``). The last two depend on the
architecture only and run when the model is built.
"""
from typing import Optional

import torch
from torch import nn

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerModel
from fairseq.models.transformer.transformer_legacy import base_architecture, transformer_iwslt_de_en
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase

from .layer_stacks import LayerClassDecoder, LayerClassEncoder, LayerClassModelMixin

WSKIP_PREFIX = "w_skip_"
WSKIP_INITS = ("ones", "admin", "admin-analytic", "deepnet")


class _StopForward(Exception):
    """Raised by a profiler to end a forward pass early (see admin_init)."""


class NoFastPathMixin:
    """Keeps a fairseq Transformer layer on its Python forward path.

    fairseq 0.12.2 (not the fork installed here) sends eval-mode Post-LN encoder layers
    loaded from a state dict through a fused kernel (torch's _transformer_encoder_layer_fwd)
    that never calls residual_connection (so would ignore w_skip) and applies the layer's
    LayerNorms (which LN-free layers replace). These attributes decide that path; pinning
    them (setters ignore what fairseq assigns) keeps the slow path.
    """

    load_to_BT = property(lambda self: False, lambda self, value: None)
    can_use_fastpath = property(lambda self: False, lambda self, value: None)
    BT_version = property(lambda self: False, lambda self, value: None)


class WSkipLayerMixin(NoFastPathMixin):
    """The residual connection ``w_skip * residual + x`` for a fairseq Transformer layer.

    Which sublayer is calling: fairseq's layer ``forward`` calls
    ``residual_connection`` once per sublayer, always in the same order (self-attention,
    [encoder attention,] FFN), and passes nothing that says which. The layer's own
    ``forward`` (overridden below, it only wraps the parent's) therefore writes down, at
    its start, the order of the sublayers this call will run (``_wskip_order``: the
    decoder's encoder attention runs only when there is an encoder output) and resets a
    call counter; ``residual_connection`` takes the next name from that order. At the end
    of ``forward`` the counter must equal the number of sublayers, so a fairseq version
    that called the hook a different number of times would fail loudly, not silently
    mis-assign weights. Activation checkpointing re-runs the whole ``forward``, so the
    counter is reset there too.
    """

    #: "encoder" or "decoder": Admin accumulates the two stacks separately.
    wskip_stack = ""

    def _add_wskip(self, names, embed_dim):
        self.wskip_names = tuple(names)
        for name in names:
            setattr(self, WSKIP_PREFIX + name, nn.Parameter(torch.ones(embed_dim)))
        self._wskip_order = ()
        self._wskip_calls = 0
        self._wskip_mask = None
        #: profiling callback (admin_init): f(layer, sublayer, branch, residual, mask) -> None
        self.wskip_profiler = None

    def _start(self, order, padding_mask):
        self._wskip_order = order
        self._wskip_calls = 0
        self._wskip_mask = padding_mask

    def _finish(self):
        if self._wskip_calls != len(self._wskip_order):
            raise RuntimeError(
                f"{type(self).__name__}: residual_connection was called {self._wskip_calls} "
                f"times, expected {len(self._wskip_order)} ({', '.join(self._wskip_order)})"
            )

    def residual_connection(self, x, residual):
        name = self._wskip_order[self._wskip_calls]
        self._wskip_calls += 1
        if self.wskip_profiler is not None:
            self.wskip_profiler(self, name, x, residual, self._wskip_mask)
        # 1.0 * residual == residual exactly, so w_skip = 1 gives fairseq's residual + x.
        return getattr(self, WSKIP_PREFIX + name) * residual + x


class WSkipTransformerEncoderLayer(WSkipLayerMixin, TransformerEncoderLayerBase):
    wskip_stack = "encoder"

    def __init__(self, cfg, return_fc=False):
        super().__init__(cfg, return_fc=return_fc)
        self._add_wskip(("self_attn", "ffn"), cfg.encoder.embed_dim)

    def forward(self, x, encoder_padding_mask: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor] = None):
        self._start(self.wskip_names, encoder_padding_mask)
        out = super().forward(x, encoder_padding_mask, attn_mask=attn_mask)
        self._finish()
        return out


class WSkipTransformerDecoderLayer(WSkipLayerMixin, TransformerDecoderLayerBase):
    wskip_stack = "decoder"

    def __init__(self, cfg, no_encoder_attn=False, add_bias_kv=False, add_zero_attn=False):
        super().__init__(cfg, no_encoder_attn=no_encoder_attn, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
        names = ("self_attn", "ffn") if self.encoder_attn is None else ("self_attn", "encoder_attn", "ffn")
        self._add_wskip(names, cfg.decoder.embed_dim)

    def forward(self, x, encoder_out=None, encoder_padding_mask=None, incremental_state=None,
                prev_self_attn_state=None, prev_attn_state=None, self_attn_mask=None,
                self_attn_padding_mask=None, need_attn=False, need_head_weights=False):  # fmt: skip
        order = self.wskip_names
        if encoder_out is None:  # fairseq's forward then skips the encoder attention
            order = tuple(n for n in order if n != "encoder_attn")
        self._start(order, self_attn_padding_mask)
        out = super().forward(
            x, encoder_out, encoder_padding_mask, incremental_state, prev_self_attn_state,
            prev_attn_state, self_attn_mask, self_attn_padding_mask, need_attn, need_head_weights,
        )  # fmt: skip
        self._finish()
        return out


class WSkipTransformerEncoder(LayerClassEncoder):
    layer_class = WSkipTransformerEncoderLayer


class WSkipTransformerDecoder(LayerClassDecoder):
    layer_class = WSkipTransformerDecoderLayer


@register_model("transformer_wskip")
class WSkipTransformerModel(LayerClassModelMixin, TransformerModel):
    """Post-LN Transformer, ``LayerNorm(w_skip * x + f(x))`` on every residual connection."""

    encoder_class, decoder_class = WSkipTransformerEncoder, WSkipTransformerDecoder

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        parser.add_argument(
            "--wskip-init", choices=WSKIP_INITS,
            help="initial w_skip: ones (default; the plain Post-LN Transformer); admin "
            "(Admin's profiling initialization on a few training batches before the first "
            "update); admin-analytic (Admin's closed form omega = sqrt((K+1)/ln(K+1) - 1), "
            "K residual sublayers per stack, learnable); deepnet (DeepNorm: w_skip a "
            "constant alpha, fc1/fc2/v_proj/out_proj Xavier-normal with gain beta)",
        )  # fmt: skip

    @classmethod
    def build_model(cls, args, task):
        for side in ("encoder", "decoder"):
            if getattr(args, f"{side}_normalize_before", False):
                raise SystemExit(
                    f"fairseq-gradinit: error: --{side}-normalize-before: {args.arch} is a Post-LN "
                    "Transformer (w_skip weighs the residual inside LayerNorm(w_skip * x + f(x))); "
                    "use a Pre-LN architecture such as transformer without --wskip-init"
                )
        args.wskip_init = getattr(args, "wskip_init", None) or "ones"
        model = super().build_model(args, task)
        model.wskip_init = args.wskip_init
        # Inits that depend on the architecture only are part of building the model: they
        # must hold whatever task builds it, and DeepNet's alpha must be frozen before
        # fairseq collects the trainable parameters for its optimizer. (The init modules
        # sit above the models, hence the imports here.)
        if args.wskip_init == "deepnet":
            from ..deepnet_init import deepnet_initialize

            deepnet_initialize(model)
        elif args.wskip_init == "admin-analytic":
            from ..admin_analytic_init import admin_analytic_initialize

            admin_analytic_initialize(model)
        return model


def wskip_parameter_names(model: nn.Module):
    """Names (as ``model.named_parameters()`` gives them) of the model's w_skip vectors."""
    return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1].startswith(WSKIP_PREFIX)]


def wskip_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, WSkipLayerMixin)]


@register_model_architecture("transformer_wskip", "transformer_wskip")
def transformer_wskip(args):
    args.wskip_init = getattr(args, "wskip_init", None) or "ones"
    base_architecture(args)


@register_model_architecture("transformer_wskip", "transformer_wskip_iwslt_de_en")
def transformer_wskip_iwslt_de_en(args):
    args.wskip_init = getattr(args, "wskip_init", None) or "ones"
    transformer_iwslt_de_en(args)
