"""Pieces of the fairseq hook that need no training run."""
import math
import types

import pytest
import torch
from torch import nn

from fairseq_gradinit.weights import scale_training_weights


def _fp16_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)).half()


@pytest.mark.parametrize("flat", [True, False])
def test_fp16_master_weights_are_scaled_and_the_model_copies_them(flat):
    from fairseq.optim.fp16_optimizer import FP16Optimizer

    model = _fp16_model()
    params = list(model.parameters())
    if flat:  # FP16Optimizer's flat layout, keyed by CUDA device index
        flat_master = torch.cat([p.detach().float().view(-1) for p in params])
        master = {0: torch.nn.Parameter(flat_master)}
    else:
        master = FP16Optimizer.build_fp32_params(None, params, flatten=False)
    initial32 = [p.detach().float().clone() for p in params]
    optimizer = types.SimpleNamespace(fp16_params=params, fp32_params=master)
    scales = {"0.weight": 0.5, "1.weight": 0.3, "2.bias": 2.0}
    scale_training_weights(model, optimizer, scales)

    views = master[0].data.split([p.numel() for p in params]) if flat else [m.data for m in master]
    for (name, p), p32, init in zip(model.named_parameters(), views, initial32):
        expected = init.view(-1) * torch.tensor(scales.get(name, 1.0))
        assert torch.equal(p32.view(-1), expected), name
        assert torch.equal(p.view(-1), expected.half()), name


def test_without_a_master_copy_the_model_itself_is_scaled():
    model = nn.Linear(3, 3)
    before = model.weight.detach().clone()
    scale_training_weights(model, types.SimpleNamespace(), {"weight": 0.25})
    assert torch.equal(model.weight, before * 0.25)


def test_the_hook_warns_once_naming_the_modules_left_without_a_scale(caplog):
    from fairseq_gradinit.hook import _warn_unscaled
    from fairseq_gradinit.selection import select_tensors

    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(4))

    model = nn.Sequential(nn.Linear(4, 4), Gain(), nn.LayerNorm(4))
    with caplog.at_level("WARNING", logger="fairseq_gradinit"):
        _warn_unscaled(model, select_tensors(model))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "1 (Gain: g)" in warnings[0] and "0 (" not in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="fairseq_gradinit"):
        _warn_unscaled(nn.Sequential(nn.Linear(4, 4)), select_tensors(nn.Sequential(nn.Linear(4, 4))))
    assert not caplog.records


def test_logged_losses_are_in_bits_like_fairseqs_and_the_norm_is_left_alone():
    from fairseq_gradinit.core import IterationRecord
    from fairseq_gradinit.hook import _stats

    nats = IterationRecord(10, "objective", 3 * math.log(2), 2 * math.log(2), 7.5, 9.0, 0.5, 1.0, 1.5)
    stats = _stats(nats)
    assert stats["loss_S"] == 3.0 and stats["loss_S~"] == 2.0
    assert stats["gnorm"] == 7.5 and stats["gamma"] == 9.0
    assert _stats(IterationRecord(11, "constraint", math.log(2), None, 1, 1, 1, 1, 1))["loss_S~"] == "-"
