"""The hook inside one process: mixed-precision optimizers, nan mid-GradInit, model kinds.

Real fairseq objects (task, model, criterion, optimizer wrappers) built the way
fairseq-train builds them, without a training run around them.
"""
import copy

import pytest
import torch

from conftest import TINY_ARCH, USER_COMMAND
from fairseq_gradinit.core import GradInitError
from fairseq_gradinit.hook import run_gradinit


def build(data_bin, *flags):
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(
        options.get_training_parser(),
        [data_bin, *USER_COMMAND, *TINY_ARCH, "--cpu", "--gradinit-iters", "3", *flags],
    )
    cfg = convert_namespace_to_omegaconf(args)
    utils.set_torch_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model = task.build_model(cfg.model)
    return cfg, task, model, task.build_criterion(cfg.criterion)


class DtypeSpy(torch.nn.Module):
    """A criterion wrapper that records the dtype GradInit evaluates the model in."""

    def __init__(self, criterion):
        super().__init__()
        self.criterion, self.dtypes = criterion, []

    def forward(self, model, sample):
        self.dtypes.append(model.encoder.embed_tokens.weight.dtype)
        return self.criterion(model, sample)


@pytest.mark.parametrize("precision", ["--fp16", "--bf16"])
def test_half_precision_gradinit_runs_in_fp32_and_scales_the_fp32_master_weights(data_bin, precision):
    from fairseq.optim.fp16_optimizer import FP16Optimizer

    cfg, task, model, criterion = build(data_bin, precision, "--fp16-no-flatten-grads")
    model = model.to(torch.bfloat16 if precision == "--bf16" else torch.half)  # as the trainer does
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = FP16Optimizer.build_optimizer(cfg, params)
    initial32 = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    spy = DtypeSpy(criterion)

    result = run_gradinit(task, model, spy, optimizer)

    assert spy.dtypes and set(spy.dtypes) == {torch.float32}
    masters = dict(zip([n for n, p in model.named_parameters() if p.requires_grad], optimizer.fp32_params))
    for name, p in model.named_parameters():
        expected = initial32[name] * torch.tensor(result.scales.get(name, 1.0))
        assert torch.equal(masters[name].data, expected), name  # the first step starts here
        assert torch.equal(p.data, expected.to(p.dtype)), name


def test_memory_efficient_fp16_scales_the_half_weights_in_place(data_bin):
    from fairseq.optim.fp16_optimizer import MemoryEfficientFP16Optimizer

    cfg, task, model, criterion = build(data_bin, "--memory-efficient-fp16")
    model = model.half()
    optimizer = MemoryEfficientFP16Optimizer.build_optimizer(cfg, list(model.parameters()))
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = run_gradinit(task, model, criterion, optimizer)
    for name, scale in result.scales.items():
        expected = initial[name] * torch.tensor(scale, dtype=torch.half)
        assert torch.equal(model.get_parameter(name).data, expected), name


def test_amp_keeps_an_fp32_model_and_scales_it(data_bin):
    cfg, task, model, criterion = build(data_bin, "--amp")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = run_gradinit(task, model, criterion, optimizer=object())
    for name, scale in result.scales.items():
        assert torch.equal(model.get_parameter(name), initial[name] * torch.tensor(scale)), name


class NanAt(torch.nn.Module):
    """A criterion whose loss turns nan at its ``call``-th call (an injected fault)."""

    def __init__(self, criterion, call):
        super().__init__()
        self.criterion, self.call, self.calls = criterion, call, 0

    def forward(self, model, sample):
        self.calls += 1
        loss, size, log = self.criterion(model, sample)
        return (loss * float("nan") if self.calls == self.call else loss), size, log


def test_nan_mid_gradinit_names_the_iteration_and_leaves_the_initialization(data_bin):
    cfg, task, model, criterion = build(data_bin, "--gradinit-iters", "6")
    initial = copy.deepcopy(model.state_dict())
    with pytest.raises(GradInitError, match="iteration 3: the loss on S is nan"):
        # an iteration: S as --gradinit-hvp-chunks micro-batches (gamma is finite), then S~
        per_iteration = cfg.task.gradinit_hvp_chunks + 1
        run_gradinit(task, model, NanAt(criterion, call=2 * per_iteration + 1), optimizer=object())
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())


def test_pre_ln_transformer_gets_sensible_scales(data_bin):
    cfg, task, model, criterion = build(
        data_bin, "--encoder-normalize-before", "--decoder-normalize-before", "--gradinit-iters", "10"
    )
    result = run_gradinit(task, model, criterion, optimizer=object())
    assert "encoder.layer_norm.weight" in result.scales  # Pre-LN's final LayerNorms are scaled too
    assert all(0.01 <= v <= 1.2 for v in result.scales.values())


def test_a_training_set_that_gives_no_batches_is_a_clear_error(data_bin):
    # Every sentence is longer than 1 position, so fairseq's batching filters them all.
    cfg, task, model, criterion = build(data_bin, "--max-source-positions", "1", "--max-target-positions", "1")
    initial = copy.deepcopy(model.state_dict())
    with pytest.raises(GradInitError, match="the training set 'train' gives no GradInit batch: all its sentences are longer"):
        run_gradinit(task, model, criterion, optimizer=object())
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())


def test_constraint_branch_on_a_fairseq_transformer_hvp_matches_autograd(data_bin):
    """Attention, token-normalised loss and all: the default micro-batched Hessian-vector
    product equals the double backward through the whole batch."""
    from fairseq_gradinit import core
    from fairseq_gradinit.fairseq_batches import criterion_loss, sample_pairs

    cfg, task, model, criterion = build(data_bin)
    s, _ = next(sample_pairs(task, model, 4096, None, 0.5, seed=1))
    loss_fn = criterion_loss(criterion, task.target_dictionary.pad())  # as the hook calls it

    from fairseq_gradinit.selection import select_tensors, unscaled_modules

    assert unscaled_modules(model, select_tensors(model)) == []  # no warning on fairseq's transformer
    exact = core.norm_gradient(model, loss_fn, s, core.GradInitSettings(second_order=core.AUTOGRAD))
    for chunks in (2, 3):
        hvp = core.norm_gradient(model, loss_fn, s, core.GradInitSettings(second_order=core.HVP, hvp_chunks=chunks))
        assert torch.allclose(hvp, exact, rtol=1e-3, atol=1e-4 * exact.abs().max().item()), chunks
