"""Which tensors get a GradInit scale: one test per selection rule."""
import warnings

import pytest
import torch
from torch import nn

from fairseq_gradinit.selection import BIAS, WEIGHT, select_tensors, unscaled_modules


class FusedLayerNorm(nn.Module):
    """Stand-in with apex's shape: a plain nn.Module (not an nn.LayerNorm) named FusedLayerNorm."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class T5LayerNorm(nn.Module):
    """RMSNorm-style layer of another library: a gain, no bias, its own class."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Block(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = norm

    def forward(self, x):
        return self.norm(self.fc(x))


def test_a_plain_module_named_fused_layer_norm_gets_a_scale():
    assert not issubclass(FusedLayerNorm, nn.LayerNorm)
    net = Block(FusedLayerNorm(4))
    selected = select_tensors(net)
    assert selected["norm.weight"] == WEIGHT
    assert "norm.bias" not in selected  # zero-initialised: a scale would change nothing
    assert unscaled_modules(net, selected) == []


def test_a_non_zero_bias_of_a_fused_layer_norm_is_scaled_as_a_bias():
    net = Block(FusedLayerNorm(4))
    with torch.no_grad():
        net.norm.bias.fill_(0.1)
    assert select_tensors(net)["norm.bias"] == BIAS


@pytest.mark.parametrize(
    "make",
    [
        lambda: __import__("fairseq.modules", fromlist=["Fp32LayerNorm"]).Fp32LayerNorm(4),
        lambda: nn.RMSNorm(4),
        lambda: T5LayerNorm(4),
        lambda: nn.GroupNorm(2, 4),
    ],
    ids=["fairseq-Fp32LayerNorm", "nn.RMSNorm", "T5LayerNorm", "GroupNorm"],
)
def test_every_normalisation_layer_gets_a_scale_on_its_gain(make):
    net = Block(make())
    assert select_tensors(net)["norm.weight"] == WEIGHT


def test_packed_qkv_of_torch_multihead_attention_gets_one_scale_per_tensor():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    selected = select_tensors(mha)
    assert selected["in_proj_weight"] == WEIGHT
    assert selected["bias_k"] == WEIGHT and selected["bias_v"] == WEIGHT
    assert selected["out_proj.weight"] == WEIGHT
    assert "in_proj_bias" not in selected  # torch zero-initialises it
    with torch.no_grad():
        mha.in_proj_bias.fill_(0.1)
    assert select_tensors(mha)["in_proj_bias"] == BIAS
    separate = nn.MultiheadAttention(8, 2, kdim=6, vdim=5)
    assert {"q_proj_weight", "k_proj_weight", "v_proj_weight"} <= set(select_tensors(separate))


def test_weight_norm_scales_the_magnitude_and_never_the_direction():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = nn.utils.weight_norm(nn.Linear(4, 3))
    selected = select_tensors(old)
    assert "weight_g" in selected and "weight_v" not in selected
    new = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))
    selected = select_tensors(new)
    assert "parametrizations.weight.original0" in selected
    assert "parametrizations.weight.original1" not in selected
    assert unscaled_modules(new, selected) == []


def test_scaling_weight_g_scales_the_weight_it_computes():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = nn.utils.weight_norm(nn.Linear(4, 3))
    from fairseq_gradinit.core import apply_scales

    x = torch.randn(2, 4)
    before = layer(x) - layer.bias
    apply_scales(layer, {"weight_g": 0.5})
    assert torch.allclose(layer(x) - layer.bias, 0.5 * before, atol=1e-6)


def test_fconv_conv_tbc_and_linear_layers_scale_weight_g():
    from fairseq.models import fconv

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = fconv.ConvTBC(4, 6, 3)
        linear = fconv.Linear(4, 6)
    net = nn.ModuleDict({"conv": conv, "linear": linear})
    selected = select_tensors(net)
    assert {"conv.weight_g", "linear.weight_g"} <= set(selected)
    assert not any(n.endswith("weight_v") for n in selected)
    assert "conv.bias" not in selected  # fconv zero-initialises its biases
    assert unscaled_modules(net, selected) == []


def test_zero_filled_and_frozen_tensors_stay_unscaled_and_are_not_reported():
    class PostLNLayer(nn.Module):  # fairseq-style unused placeholders beside the real layers
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.in_proj_weight = nn.Parameter(torch.zeros(12, 4))
            self.norm = FusedLayerNorm(4)

    layer = PostLNLayer()
    layer.norm.weight.requires_grad_(False)
    selected = select_tensors(layer)
    assert "in_proj_weight" not in selected and "norm.weight" not in selected
    assert unscaled_modules(layer, selected) == []


def test_modules_with_trainable_parameters_but_no_scale_are_listed():
    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(4))

    net = nn.Sequential(nn.Linear(4, 4), Gain(), nn.Linear(4, 4))
    assert unscaled_modules(net, select_tensors(net)) == ["1 (Gain: g)"]
    assert unscaled_modules(net, select_tensors(net), ignore=["1.g"]) == []
    assert unscaled_modules(net, select_tensors(net, extra_names=["1.g"])) == []
