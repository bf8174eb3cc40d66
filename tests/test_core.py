"""Algorithm 1 on plain PyTorch models: one test per rule of the method."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fairseq_gradinit.core import (
    CONSTRAINT,
    OBJECTIVE,
    GradInitError,
    GradInitSettings,
    _iteration,
    _step_direction,
    apply_scales,
    gradinit,
    min_split_size,
    norm_gradient,
    overlap_slices,
    split_batch,
)
from fairseq_gradinit.selection import select_tensors


def make_net(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
    )


def make_data(n_batches=200, batch=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return [(x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]) for i in range(n_batches)]


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def pairs(data, overlap=0.5):
    return [split_batch(b, overlap) for b in data]


def test_split_gives_s_the_first_and_s_tilde_the_last_two_thirds_sharing_half():
    x = torch.arange(12)
    s, s_tilde = split_batch(x, overlap=0.5)
    assert s.tolist() == list(range(0, 8)) and s_tilde.tolist() == list(range(4, 12))
    assert len(set(s.tolist()) & set(s_tilde.tolist())) == len(s) // 2


def test_overlap_setting_changes_the_shared_share():
    s, s_tilde = overlap_slices(100, overlap=0.0)
    assert (s.stop - s.start, s_tilde.start) == (50, 50)
    s, s_tilde = overlap_slices(100, overlap=0.8)
    shared = s.stop - s_tilde.start
    assert abs(shared / (s.stop - s.start) - 0.8) < 0.05


@pytest.mark.parametrize("n", [0, 1, 2])
def test_a_batch_too_small_to_split_is_an_error_naming_the_batch_size(n):
    with pytest.raises(GradInitError, match="too small to split") as e:
        overlap_slices(n, 0.5)
    assert e.value.setting == "max_tokens"


@pytest.mark.parametrize("overlap, smallest", [(0.0, 2), (0.5, 3), (0.9, 6)])
def test_min_split_size_is_the_smallest_batch_that_splits(overlap, smallest):
    assert min_split_size(overlap) == smallest
    overlap_slices(smallest, overlap)
    with pytest.raises(GradInitError, match=f"it needs {smallest}"):
        overlap_slices(smallest - 1, overlap)


@pytest.mark.parametrize("overlap", [-0.1, 1.0, 1.5])
def test_overlap_outside_zero_one_is_refused(overlap):
    with pytest.raises(GradInitError) as e:
        overlap_slices(10, overlap)
    assert e.value.setting == "overlap"


def test_objective_branch_lowers_the_lookahead_loss_on_fresh_batches():
    net = make_net()
    with torch.no_grad():  # a badly scaled start (saturated tanh) that scaling can fix
        for p in net.parameters():
            p.mul_(4)
    settings = GradInitSettings(iters=160, eta=0.1, target="adam", lr=2e-2)
    result = gradinit(net, ce, pairs(make_data(160)), settings)
    assert all(r.branch == OBJECTIVE for r in result.history)
    first = sum(r.loss_s_tilde for r in result.history[:20]) / 20
    last = sum(r.loss_s_tilde for r in result.history[-20:]) / 20
    assert last < first - 0.1, (first, last)


def test_constraint_branch_runs_when_gamma_is_below_the_norm_and_the_norm_drops():
    net = make_net()
    data = make_data(100)
    initial = gradinit(copy.deepcopy(net), ce, pairs(data), GradInitSettings(iters=1, eta=0.05)).history[0].grad_norm
    settings = GradInitSettings(iters=100, eta=0.05, gamma=initial / 4, lr=2e-2)
    result = gradinit(net, ce, pairs(data), settings)
    assert result.history[0].branch == CONSTRAINT
    norms = [r.grad_norm for r in result.history]
    assert sum(norms[-10:]) / 10 < 0.6 * initial
    assert all(r.loss_s_tilde is None for r in result.history if r.branch == CONSTRAINT)


def test_gamma_factor_bounds_the_norm_relative_to_the_first_iteration():
    data = pairs(make_data(30))
    loose = gradinit(make_net(), ce, data, GradInitSettings(iters=30, eta=0.05, gamma_factor=1e6))
    assert all(r.branch == OBJECTIVE for r in loose.history)
    tight = gradinit(make_net(), ce, data, GradInitSettings(iters=30, eta=0.05, gamma_factor=0.5, lr=2e-2))
    first = tight.history[0]
    assert first.branch == CONSTRAINT and first.gamma == pytest.approx(0.5 * first.grad_norm)
    assert all(r.gamma == first.gamma for r in tight.history)


def test_first_objective_step_after_constraint_steps_is_a_full_adam_step(monkeypatch):
    # Each branch keeps its own Adam moments (the authors' release): the large gradients
    # of the norm must not shrink the steps that lower the loss.
    net = make_net()
    data = make_data(60)
    initial = gradinit(copy.deepcopy(net), ce, pairs(data), GradInitSettings(iters=1, eta=0.05)).history[0].grad_norm
    steps, original_step = [], torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        scales = self.param_groups[0]["params"][0]
        before = scales.detach().clone()
        out = original_step(self, *args, **kwargs)
        steps.append((id(self), (scales.detach() - before).abs()))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    settings = GradInitSettings(iters=60, eta=0.05, gamma=initial / 2, lr=2e-2)
    result = gradinit(net, ce, pairs(data), settings)
    branches = [r.branch for r in result.history]
    k = branches.index(OBJECTIVE)
    assert k > 0 and CONSTRAINT in branches[:k]
    assert steps[k][0] != steps[0][0]  # another optimizer state than the constraint steps'
    moved = steps[k][1][steps[k][1] > 0]
    assert len(moved) > 0 and torch.allclose(moved, torch.full_like(moved, 2e-2), rtol=1e-3)


def test_adam_target_measures_the_l1_norm_and_sgd_target_the_l2_norm():
    data = make_data(1)
    net = make_net()
    grads = torch.autograd.grad(ce(net, split_batch(data[0])[0]), list(net.parameters()))
    l1 = sum(g.abs().sum() for g in grads).item()
    l2 = math.sqrt(sum(g.pow(2).sum() for g in grads).item())
    adam = gradinit(make_net(), ce, pairs(data), GradInitSettings(iters=1, target="adam"))
    sgd = gradinit(make_net(), ce, pairs(data), GradInitSettings(iters=1, target="sgd", gamma=1.0))
    assert adam.history[0].grad_norm == pytest.approx(l1, rel=1e-5)
    assert sgd.history[0].grad_norm == pytest.approx(l2, rel=1e-5)


def _scale_gradient(net, s, s_tilde, settings, expect_constraint=False):
    scaled = select_tensors(net)
    params = dict(net.named_parameters())
    base = {n: p.detach() for n, p in params.items()}
    scales = torch.ones(len(scaled), dtype=torch.float64, requires_grad=True)
    objective = __import__("fairseq_gradinit.core", fromlist=["_Objective"])._Objective(net, ce)
    record = _iteration(
        1, objective, base, list(scaled), scales, s, s_tilde, settings, lambda t: None,
        gamma=settings.gamma, expect_constraint=expect_constraint,
    )
    return record, scales.grad


def _loss_at(net, scales, batch, names, step=None, eta=0.0):
    from torch.func import functional_call

    tensors = {n: p.detach() for n, p in net.named_parameters()}
    for i, n in enumerate(names):
        tensors[n] = scales[i] * tensors[n]
    if step is not None:
        tensors = {n: t - eta * step[n] for n, t in tensors.items()}
    return F.cross_entropy(functional_call(net, tensors, (batch[0],)), batch[1])


@pytest.mark.parametrize("expected_constraint", [False, True])
@pytest.mark.parametrize("target", ["adam", "sgd"])
def test_objective_gradient_holds_the_virtual_step_constant(target, expected_constraint):
    """Finite differences of L(S~; theta_m - eta*A[g(theta_1)]): A[g] is not differentiated."""
    net = make_net().double()
    s, s_tilde = split_batch(make_data(1)[0])
    s = (s[0].double(), s[1])
    s_tilde = (s_tilde[0].double(), s_tilde[1])
    eta = 0.1
    gamma = 3.0 if target == "sgd" else math.inf  # the SGD step's length (paper 3.5)
    settings = GradInitSettings(iters=1, eta=eta, target=target, gamma=gamma)
    record, grad = _scale_gradient(net, s, s_tilde, settings, expect_constraint=expected_constraint)
    assert record.branch == OBJECTIVE
    names = list(select_tensors(net))
    grads = torch.autograd.grad(ce(net, s), list(net.parameters()))
    if target == "adam":
        step = {n: g.sign() for (n, _), g in zip(net.named_parameters(), grads)}
    else:
        l2 = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        step = {n: gamma * g / l2 for (n, _), g in zip(net.named_parameters(), grads)}
    h = 1e-6
    for i in range(len(names)):
        up, down = torch.ones(len(names), dtype=torch.float64), torch.ones(len(names), dtype=torch.float64)
        up[i] += h
        down[i] -= h
        numeric = (_loss_at(net, up, s_tilde, names, step, eta) - _loss_at(net, down, s_tilde, names, step, eta)) / (2 * h)
        assert grad[i].item() == pytest.approx(numeric.item(), rel=1e-4, abs=1e-8), names[i]


@pytest.mark.parametrize(
    "second_order, chunks, expected",
    [("autograd", 1, False), ("autograd", 1, True), ("hvp", 1, False), ("hvp", 2, True), ("hvp", 5, False)],
    ids=["autograd-first-order-first", "autograd-graph-built-at-once", "hvp-1-chunk", "hvp-2-chunks", "hvp-5-chunks"],
)
@pytest.mark.parametrize("target", ["sgd", "adam"])
def test_constraint_gradient_is_the_second_order_gradient_of_the_norm(target, second_order, chunks, expected):
    rel = 1e-4
    net = make_net().double()
    s, s_tilde = split_batch(make_data(1)[0])
    s = (s[0].double(), s[1])
    settings = GradInitSettings(
        iters=1, eta=0.1, target=target, gamma=1e-9, second_order=second_order, hvp_chunks=chunks
    )
    record, grad = _scale_gradient(net, s, s_tilde, settings, expect_constraint=expected)
    assert record.branch == CONSTRAINT
    names = list(select_tensors(net))

    def norm_at(scales):
        from torch.func import functional_call

        tensors = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
        scaled = dict(tensors)
        for i, n in enumerate(names):
            scaled[n] = scales[i] * tensors[n]
        loss = F.cross_entropy(functional_call(net, scaled, (s[0],)), s[1])
        g = torch.autograd.grad(loss, list(scaled.values()))
        if target == "adam":
            return sum(x.abs().sum() for x in g)
        return torch.sqrt(sum(x.pow(2).sum() for x in g))

    h = 1e-6
    numeric = torch.zeros(len(names), dtype=torch.float64)
    for i in range(len(names)):
        up, down = torch.ones(len(names), dtype=torch.float64), torch.ones(len(names), dtype=torch.float64)
        up[i] += h
        down[i] -= h
        numeric[i] = (norm_at(up) - norm_at(down)) / (2 * h)
    # The l1 norm has kinks where a gradient entry changes sign; a numeric derivative
    # across one is meaningless, so compare per scale at a tolerance relative to the largest.
    tolerance = rel * numeric.abs().max().item()
    for i, name in enumerate(names):
        assert abs(grad[i].item() - numeric[i].item()) <= tolerance + rel * abs(numeric[i].item()), name


def test_scales_never_leave_their_bounds():
    net = make_net()
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.bias.normal_()
    settings = GradInitSettings(iters=150, eta=0.5, lr=0.3, min_scale=0.2, max_scale=1.3)
    seen = []
    result = gradinit(net, ce, pairs(make_data(150)), settings, on_iteration=seen.append)
    kinds = select_tensors(net)
    assert min(r.scale_min for r in seen) >= 0.0 and max(r.scale_max for r in seen) <= 1.3
    for name, value in result.scales.items():
        assert value <= 1.3
        assert value >= (0.0 if kinds[name] == "bias" else 0.2), name
    assert any(v == pytest.approx(0.2) or v == pytest.approx(1.3) for v in result.scales.values())


def test_each_scale_gradient_is_clamped_to_grad_clip(monkeypatch):
    net = make_net()
    s, s_tilde = split_batch(make_data(1)[0])
    _, raw = _scale_gradient(net, s, s_tilde, GradInitSettings(iters=1, eta=5.0, gamma=1e-9))
    clip = raw.abs().max().item() / 10
    assert (raw.abs() > clip).any() and (raw.abs() < clip).any()
    seen = []
    original_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["params"][0].grad.clone())
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    settings = GradInitSettings(iters=1, eta=5.0, gamma=1e-9, grad_clip=clip)
    gradinit(make_net(), ce, [(s, s_tilde)], settings)
    assert torch.allclose(seen[0], raw.float().clamp(-clip, clip))


def test_a_tensor_shared_by_two_modules_gets_one_scale():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.hidden = nn.Linear(6, 6)
            self.out = nn.Linear(6, 10, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, x):
            return self.out(torch.tanh(self.hidden(self.embed(x))).mean(1))

    torch.manual_seed(0)
    model = Tied()
    selected = select_tensors(model)
    assert list(selected) == ["embed.weight", "hidden.weight", "hidden.bias"]
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 10, (12, 4), generator=g), torch.randint(0, 10, (12,), generator=g)) for _ in range(5)]
    result = gradinit(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), pairs(batches), GradInitSettings(iters=5, lr=0.05))
    apply_scales(model, result.scales)
    assert model.out.weight is model.embed.weight
    assert torch.equal(model.embed.weight, result.scales["embed.weight"] * init["embed.weight"])


def test_a_module_reachable_under_two_names_keeps_its_parameters():
    class SharedModule(nn.Module):  # fairseq's --share-all-embeddings: one module, two names
        def __init__(self):
            super().__init__()
            self.encoder_embed = self.decoder_embed = nn.Embedding(10, 6)
            self.out = nn.Linear(6, 10)

        def forward(self, x):
            return self.out(self.encoder_embed(x).mean(1) + self.decoder_embed(x).mean(1))

    torch.manual_seed(0)
    model = SharedModule()
    before = [id(p) for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 10, (12, 4), generator=g), torch.randint(0, 10, (12,), generator=g)) for _ in range(3)]
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])
    result = gradinit(model, loss_fn, pairs(batches), GradInitSettings(iters=3))
    assert list(result.scales) == ["encoder_embed.weight", "out.weight", "out.bias"]
    assert [id(p) for p in model.parameters()] == before
    assert isinstance(model.decoder_embed.weight, nn.Parameter)
    loss_fn(model, batches[0]).backward()  # the model still trains
    assert model.encoder_embed.weight.grad is not None


def test_zero_tensors_are_skipped_not_divided_by_zero():
    net = make_net()
    with torch.no_grad():
        net[0].bias.zero_()
    selected = select_tensors(net)
    assert "0.bias" not in selected and "0.weight" in selected
    result = gradinit(net, ce, pairs(make_data(3)), GradInitSettings(iters=3))
    assert all(math.isfinite(v) for v in result.scales.values())


def test_final_weights_are_exactly_scale_times_initial_tensor():
    net = make_net()
    init = {n: p.detach().clone() for n, p in net.named_parameters()}
    result = gradinit(net, ce, pairs(make_data(20)), GradInitSettings(iters=20, lr=0.05))
    for n, p in net.named_parameters():
        assert torch.equal(p, init[n]), "gradinit must not touch the model"
    apply_scales(net, result.scales)
    for n, p in net.named_parameters():
        expected = init[n] * torch.tensor(result.scales[n], dtype=torch.float32) if n in result.scales else init[n]
        assert torch.equal(p, expected), n
    assert any(abs(v - 1) > 1e-3 for v in result.scales.values())


def test_same_seed_gives_bit_identical_scales():
    def run():
        return gradinit(make_net(seed=3), ce, pairs(make_data(30)), GradInitSettings(iters=30, lr=0.02)).scales

    assert run() == run()


def test_model_runs_in_eval_mode_during_gradinit_and_its_mode_is_restored():
    net = make_net(dropout=0.5)
    modes = []

    def loss(model, batch):
        modes.append(model.training)
        return ce(model, batch)

    net.train()
    gradinit(net, loss, pairs(make_data(3)), GradInitSettings(iters=3))
    assert modes and not any(modes)
    assert net.training


def test_nan_loss_is_an_error_naming_the_iteration_and_the_model_keeps_its_initialization():
    net = make_net()
    init = {n: p.detach().clone() for n, p in net.named_parameters()}
    data = pairs(make_data(10))
    s, s_tilde = data[4]
    data[4] = ((torch.full_like(s[0], float("nan")), s[1]), s_tilde)
    with pytest.raises(GradInitError, match="iteration 5"):
        gradinit(net, ce, data, GradInitSettings(iters=10))
    for n, p in net.named_parameters():
        assert torch.equal(p, init[n])


def test_running_out_of_batches_is_an_error():
    with pytest.raises(GradInitError, match="ran out of batches after 2 of 5"):
        gradinit(make_net(), ce, pairs(make_data(2)), GradInitSettings(iters=5))


@pytest.mark.parametrize(
    "bad, setting",
    [
        (dict(iters=0), "iters"),
        (dict(iters=-3), "iters"),
        (dict(eta=0.0), "eta"),
        (dict(eta=-1e-3), "eta"),
        (dict(gamma=0.0), "gamma"),
        (dict(gamma=-1.0), "gamma"),
        (dict(lr=0.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(min_scale=0.5, max_scale=0.1), "max_scale"),
        (dict(target="rmsprop"), "target"),
        (dict(betas=(0.9, 1.0)), "betas"),
    ],
)
def test_out_of_range_settings_are_refused_naming_the_setting(bad, setting):
    with pytest.raises(GradInitError) as e:
        GradInitSettings(**bad).validate()
    assert e.value.setting == setting


def _relu_net(seed=0, depth=4, width=64):
    """ReLU layers with LayerNorms, where a finite-difference Hessian-vector product
    (the old default) agrees with the exact one on 69% of the clamped l1 signs only."""
    torch.manual_seed(seed)
    layers = [nn.Linear(8, width), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU(), nn.LayerNorm(width)]
    return nn.Sequential(*layers, nn.Linear(width, 3))


def _agreement(a, b, clip=1.0):
    """Share of scales whose clamped gradients have the same sign, and their cosine."""
    a, b = a.clamp(-clip, clip), b.clamp(-clip, clip)
    same = (a.sign() == b.sign()).float().mean().item()
    return same, F.cosine_similarity(a, b, dim=0).item()


@pytest.mark.parametrize("target", ["adam", "sgd"])
def test_default_second_order_step_agrees_with_autograd_on_a_relu_model(target):
    # ReLU units switch inside any finite-difference step (the old default agreed on
    # 69% of the signs here, cosine 0.38); an exact product differs only by rounding.
    net = _relu_net()
    s, _ = split_batch(make_data(1, batch=192)[0])
    default = GradInitSettings(target=target, gamma=1.0)
    assert default.second_order == "hvp" and default.hvp_chunks > 1
    hvp = norm_gradient(net, ce, s, default)
    exact = norm_gradient(net, ce, s, GradInitSettings(target=target, gamma=1.0, second_order="autograd"))
    same, cosine = _agreement(hvp, exact)
    assert same >= 0.99 and cosine >= 0.9999, (same, cosine)


def test_micro_batches_of_a_sum_and_size_loss_are_weighted_by_their_share_of_the_size():
    # Each "sentence" has its own number of tokens, and the loss is normalised by the
    # token count of the whole batch (fairseq): weighting micro-batches by their share
    # of the sentences would be wrong.
    net = _relu_net()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 5, 8, generator=g)
    y = torch.randint(0, 3, (30, 5), generator=g)
    mask = torch.arange(5) < torch.randint(1, 6, (30, 1), generator=g)
    mask[:10] = True  # the first micro-batch holds the longest sentences

    def token_loss(model, batch):
        x, y, mask = batch
        losses = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none")
        return (losses * mask).sum(), mask.sum()

    exact = norm_gradient(net, token_loss, (x, y, mask), GradInitSettings(second_order="autograd"))
    hvp = norm_gradient(net, token_loss, (x, y, mask), GradInitSettings(hvp_chunks=3))
    assert torch.allclose(hvp, exact, rtol=1e-4, atol=1e-5 * exact.abs().max().item())


def test_constraint_binds_and_lowers_the_norm_at_the_default_settings_when_it_starts_above_gamma():
    net = _relu_net()
    data = make_data(60)
    initial = gradinit(copy.deepcopy(net), ce, pairs(data), GradInitSettings(iters=1)).history[0].grad_norm
    defaults = GradInitSettings()
    settings = GradInitSettings(iters=60, eta=defaults.eta, gamma=0.5 * initial, lr=2e-2)
    result = gradinit(net, ce, pairs(data), settings)
    branches = [r.branch for r in result.history]
    assert branches[0] == CONSTRAINT and branches.count(CONSTRAINT) >= 5
    assert min(r.grad_norm for r in result.history) <= 0.5 * initial
    assert sum(r.grad_norm for r in result.history[-10:]) / 10 < 0.75 * initial


def test_sgd_target_needs_a_finite_gamma_because_it_sets_the_step_length():
    with pytest.raises(GradInitError, match="SGD") as e:
        GradInitSettings(target="sgd").validate()
    assert e.value.setting == "gamma"
    GradInitSettings(target="sgd", gamma_factor=0.5).validate()


def test_sgd_virtual_step_has_length_gamma():
    grads = [torch.tensor([3.0, 0.0]), torch.tensor([4.0])]
    step = _step_direction(grads, "sgd", gamma=2.5)
    assert math.sqrt(sum(d.pow(2).sum().item() for d in step)) == pytest.approx(2.5)
    assert torch.allclose(step[0], torch.tensor([1.5, 0.0]))


@pytest.mark.parametrize(
    "gamma, chunks, calls",
    [
        (1e-9, 2, [2, 2, 2]),  # constraint: S as micro-batches, their graphs reused by the HVP
        (1e-9, 3, [3, 3, 3]),
        (1e9, 2, [3, 3, 3]),  # objective at a finite gamma: the micro-batches of S, then S~
        (math.inf, 2, [2, 2, 2]),  # the constraint cannot act: S whole, then S~
    ],
)
def test_each_iteration_runs_s_forward_once(gamma, chunks, calls):
    counted = []

    def counting_ce(model, batch):
        counted[-1] += 1
        return ce(model, batch)

    def batches():
        for pair in pairs(make_data(3)):
            counted.append(0)
            yield pair

    settings = GradInitSettings(iters=3, eta=0.1, gamma=gamma, hvp_chunks=chunks)
    gradinit(make_net(), counting_ce, batches(), settings)
    assert counted == calls
