"""GradInit, Algorithm 1 of Zhu et al. (NeurIPS 2021), for any ``torch.nn.Module``.

Imports torch only. The model is never modified while GradInit runs: every evaluation
substitutes scaled tensors with ``torch.func.functional_call``, so an error at any
iteration leaves the model at its original initialization. ``apply_scales`` writes the
result at the end.

Example (a plain PyTorch model)::

    net = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 3))
    data = [(torch.randn(48, 10), torch.randint(0, 3, (48,))) for _ in range(100)]
    loss_fn = lambda model, batch: F.cross_entropy(model(batch[0]), batch[1])
    pairs = ((split_batch(b, overlap=0.5)) for b in data)  # (S, S~) pairs
    result = gradinit(net, loss_fn, pairs, GradInitSettings(iters=100, eta=1e-3))
    apply_scales(net, result.scales)
"""
import contextlib
import itertools
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call

from .selection import BIAS, select_tensors

ADAM, SGD = "adam", "sgd"
OBJECTIVE, CONSTRAINT = "objective", "constraint"
#: How the constraint branch differentiates ||g||_p: an exact Hessian-vector product over
#: micro-batches of S (default), or the double backward of the whole graph of S.
HVP, AUTOGRAD = "hvp", "autograd"


class GradInitError(ValueError):
    """Bad settings or a failed run. ``setting`` names the offending setting, if any."""

    def __init__(self, message: str, setting: Optional[str] = None):
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class GradInitSettings:
    """Hyper-parameters of Algorithm 1 (names as in the paper in brackets).

    iters: number of GradInit iterations (T).
    eta: learning rate of the target optimizer's first step (eta).
    target: the optimizer the initialization is tuned for, "adam" or "sgd" (A). It picks
        the gradient norm (l1 for Adam, l2 for SGD) and the virtual step
        (sign(g) for Adam, gamma * g/||g||_2 for SGD, paper 3.5).
    gamma: bound on the gradient norm (gamma); above it a step lowers the norm. An SGD
        target needs a finite gamma (or ``gamma_factor``): it is also the SGD step's length.
    gamma_factor: if set, gamma is this multiple of the gradient norm at the first
        iteration instead (a bound that scales with the model; ``gamma`` is ignored).
    lr: Adam learning rate of the scales (tau).
    betas: Adam betas of the scales. Each branch keeps its own Adam moments.
    grad_clip: each scale's gradient is clamped to [-grad_clip, grad_clip].
    min_scale, max_scale: bounds of weight scales (alpha lower bound 0.01 in the paper).
    min_bias_scale: lower bound of bias scales (beta lower bound, 0 in the paper).
    second_order: how the constraint branch differentiates ||g||_p through g. Both are
        exact. "hvp" (default): S runs forward as ``hvp_chunks`` micro-batches, each with
        its own graph; after the first-order gradient g, the Hessian-vector product
        H v (v = sign(g) for l1, g/||g||_2 for l2) by double backward of g . v through
        one micro-batch's graph at a time, whose results add up exactly. "autograd":
        the double backward of ||g||_p through the whole graph of S (the reference;
        more memory). Either way, while the constraint may act (a finite gamma), S
        runs attention on its math kernel, since fused kernels have no double backward.
    hvp_chunks: micro-batches of S for "hvp" (more: less memory, a little more time).
    """

    iters: int = 780
    eta: float = 5e-4
    target: str = ADAM
    gamma: float = math.inf
    gamma_factor: Optional[float] = None
    lr: float = 2.5e-3
    betas: Tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    min_scale: float = 0.01
    max_scale: float = math.inf
    min_bias_scale: float = 0.0
    second_order: str = HVP
    hvp_chunks: int = 2

    def validate(self) -> "GradInitSettings":
        """Raise ``GradInitError`` naming the first setting that is out of range."""
        checks = [
            ("iters", isinstance(self.iters, int) and self.iters >= 1, "an integer >= 1"),
            ("eta", _finite_positive(self.eta), "a finite number > 0"),
            ("target", self.target in (ADAM, SGD), f"'{ADAM}' or '{SGD}'"),
            ("gamma", self.gamma > 0 and not math.isnan(self.gamma), "> 0 (inf disables the bound)"),
            ("gamma", self.target != SGD or math.isfinite(self.gamma) or self.gamma_factor is not None,
             "finite for an SGD target (the virtual SGD step is gamma * g/||g||_2, paper 3.5)"),
            ("gamma_factor", self.gamma_factor is None or _finite_positive(self.gamma_factor), "a finite number > 0"),
            ("lr", _finite_positive(self.lr), "a finite number > 0"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
            ("grad_clip", self.grad_clip > 0, "> 0"),
            ("min_scale", _finite_positive(self.min_scale), "a finite number > 0"),
            ("max_scale", self.max_scale >= self.min_scale, f">= the min scale ({self.min_scale})"),
            ("min_bias_scale", 0 <= self.min_bias_scale <= self.max_scale, "in [0, max scale]"),
            ("second_order", self.second_order in (HVP, AUTOGRAD), f"'{HVP}' or '{AUTOGRAD}'"),
            ("hvp_chunks", isinstance(self.hvp_chunks, int) and self.hvp_chunks >= 1, "an integer >= 1"),
        ]
        for name, ok, need in checks:
            if not ok:
                raise GradInitError(f"{name} must be {need} (got {getattr(self, name)!r})", name)
        return self

    @property
    def norm_order(self) -> int:
        return 1 if self.target == ADAM else 2

    def as_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class IterationRecord:
    """What one GradInit iteration did. ``loss_s_tilde`` is None in the constraint branch."""

    iteration: int
    branch: str
    loss_s: float
    loss_s_tilde: Optional[float]
    grad_norm: float
    gamma: float
    scale_min: float
    scale_mean: float
    scale_max: float


@dataclass
class GradInitResult:
    scales: Dict[str, float]
    settings: GradInitSettings
    history: List[IterationRecord] = field(default_factory=list)
    seconds: float = 0.0


def split_batch(batch: Any, overlap: float = 0.5) -> Tuple[Any, Any]:
    """Split a batch into (S, S~) that share ``overlap`` of their samples.

    S is the first k samples and S~ the last k, with k = n / (2 - overlap): for the
    paper's overlap 0.5, S is the first 2/3 and S~ the last 2/3. Works on a tensor, or
    a (nested) tuple/list/dict of tensors whose first dimension is the batch.
    """
    n = _batch_size(batch)
    s, s_tilde = overlap_slices(n, overlap)
    return _index(batch, s, n), _index(batch, s_tilde, n)


def overlap_slices(n: int, overlap: float = 0.5) -> Tuple[slice, slice]:
    """Index ranges of S and S~ in a batch of ``n`` samples (see ``split_batch``)."""
    if not 0 <= overlap < 1:
        raise GradInitError(f"overlap must be in [0, 1) (got {overlap!r})", "overlap")
    k = _part_size(n, overlap)
    if k is None:
        raise GradInitError(
            f"a batch of {n} samples is too small to split into S and S~ sharing "
            f"{overlap:.0%} of their samples (it needs {min_split_size(overlap)}); "
            "use a larger GradInit batch",
            "max_tokens",
        )
    return slice(0, k), slice(n - k, n)


def min_split_size(overlap: float = 0.5) -> int:
    """The fewest samples a batch needs for ``split_batch`` (3 for the paper's 0.5)."""
    return next(n for n in itertools.count(2) if _part_size(n, overlap) is not None)


def _part_size(n: int, overlap: float) -> Optional[int]:
    """Samples in S (and in S~) for a batch of ``n``; None if it cannot be split."""
    k = int(round(n / (2 - overlap)))
    shared = 2 * k - n
    return k if 1 <= k < n and (overlap == 0 or shared >= 1) else None


def gradinit(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Iterable[Tuple[Any, Any]],
    settings: GradInitSettings = GradInitSettings(),
    scaled: Optional[Dict[str, str]] = None,
    on_iteration: Optional[Callable[[IterationRecord], None]] = None,
    all_reduce_mean: Optional[Callable[[Sequence[torch.Tensor]], None]] = None,
) -> GradInitResult:
    """Learn one scale per selected tensor of ``model`` (Algorithm 1); the model is not changed.

    Args:
        model: any module. It is put in eval mode (no dropout) while GradInit runs and
            its train/eval mode is restored afterwards.
        loss_fn: ``loss_fn(model, batch)`` returns the mean loss over the batch's
            samples, or a pair ``(total, size)`` whose quotient is that mean, ``total``
            being a sum over the samples (fairseq: summed token losses and the token
            count). Whenever the constraint may act, S is evaluated as ``hvp_chunks``
            micro-batches (rows of S) whose losses add up to S's: for a pair as the
            sum of their totals over the sum of their sizes, so each size must be that
            of the rows given (count them from the batch, not carry S's count along);
            for a plain mean by each micro-batch's share of the samples, exact only if
            the loss is a mean over samples. It is called with the model evaluated at
            substituted (scaled) tensors.
        batches: yields ``(S, S_tilde)`` pairs, one per iteration (see ``split_batch``).
        settings: hyper-parameters, see ``GradInitSettings``.
        scaled: ``{name: "weight" | "bias"}``, the tensors to scale; default
            ``select_tensors(model)``. Every trainable tensor takes part in the gradient
            norm and the virtual step; only these get a scale.
        on_iteration: called with an ``IterationRecord`` after every iteration.
        all_reduce_mean: for data-parallel workers: averages a list of tensors in place
            across workers. Used on the first-order gradient (so every worker takes the
            same branch and the same virtual step) and on the scales' gradient (so
            every worker ends with the same scales).

    Returns:
        ``GradInitResult`` with ``scales`` (name -> float, in model order) and a
        per-iteration ``history``.

    Raises:
        GradInitError: on bad settings, too few batches, or a non-finite loss or
            gradient norm (the message names the iteration).
    """
    settings.validate()
    scaled = select_tensors(model) if scaled is None else dict(scaled)
    names, base, scales = _leaves(model, scaled)
    device = scales.device
    is_bias = torch.tensor([scaled[n] == BIAS for n in names], device=device)
    lower = torch.where(
        is_bias,
        torch.tensor(float(settings.min_bias_scale), device=device),
        torch.tensor(float(settings.min_scale), device=device),
    )
    upper = torch.full_like(lower, float(settings.max_scale))
    # One Adam state per branch, as in the authors' release: the gradient of ||g||_p is
    # orders of magnitude larger than that of the loss, and one constraint step in a
    # shared second moment would shrink the objective steps for dozens of iterations.
    optimizers = {
        branch: torch.optim.Adam([scales], lr=settings.lr, betas=settings.betas)
        for branch in (OBJECTIVE, CONSTRAINT)
    }
    objective = _Objective(model, loss_fn)
    reduce = all_reduce_mean or (lambda tensors: None)

    result = GradInitResult(scales={}, settings=settings)
    history = result.history
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        pairs = iter(batches)
        for t in range(1, settings.iters + 1):
            try:
                s, s_tilde = next(pairs)
            except StopIteration:
                raise GradInitError(
                    f"ran out of batches after {t - 1} of {settings.iters} iterations", "iters"
                ) from None
            record = _iteration(
                t, objective, base, names, scales, s, s_tilde, settings, reduce,
                gamma=history[-1].gamma if history else settings.gamma,
                gamma_factor=None if history else settings.gamma_factor,
                expect_constraint=bool(history) and history[-1].branch == CONSTRAINT,
            )
            scales.grad.clamp_(-settings.grad_clip, settings.grad_clip)
            optimizers[record.branch].step()
            scales.grad = None
            with torch.no_grad():
                scales.copy_(torch.maximum(torch.minimum(scales, upper), lower))
                record.scale_min = scales.min().item()
                record.scale_mean = scales.mean().item()
                record.scale_max = scales.max().item()
            result.history.append(record)
            if on_iteration is not None:
                on_iteration(record)
    finally:
        model.train(was_training)
    result.seconds = time.perf_counter() - start
    result.scales = {n: float(v) for n, v in zip(names, scales.detach().cpu().tolist())}
    return result


def apply_scales(model: nn.Module, scales: Dict[str, float]) -> None:
    """Multiply each named tensor of ``model`` by its scale, in place.

    The result is exactly what GradInit evaluated: ``scale * initial tensor`` with the
    scale rounded to the tensor's dtype once.
    """
    params = dict(model.named_parameters())
    missing = [n for n in scales if n not in params]
    if missing:
        raise GradInitError(f"the model has no tensors named {missing}", "scales")
    with torch.no_grad():
        for name, value in scales.items():
            p = params[name]
            p.mul_(torch.tensor(value, dtype=torch.float32).to(p.dtype))


def norm_gradient(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Any],
    s: Any,
    settings: GradInitSettings = GradInitSettings(),
    scaled: Optional[Dict[str, str]] = None,
) -> torch.Tensor:
    """d||g(S)||_p / dm at m = 1, computed as ``settings.second_order`` says (unclamped).

    The gradient a constraint step of the first iteration starts from; for comparing the
    second-order methods with each other (bench/cost.py, tests). Order of ``scaled``.
    """
    settings = GradInitSettings(**{**settings.as_dict(), "gamma": 1e-30, "gamma_factor": None}).validate()
    names, base, scales = _leaves(model, select_tensors(model) if scaled is None else dict(scaled))
    was_training = model.training
    model.eval()
    try:
        record = _iteration(1, _Objective(model, loss_fn), base, names, scales, s, s, settings,
                            lambda tensors: None, gamma=settings.gamma)  # fmt: skip
    finally:
        model.train(was_training)
    assert record.branch == CONSTRAINT
    return scales.grad.detach()


def _leaves(model: nn.Module, scaled: Dict[str, str]):
    """(names of the scaled tensors, the model's trainable tensors, scales at 1): what
    GradInit differentiates. Checks that ``scaled`` names trainable tensors of ``model``."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    unknown = [n for n in scaled if n not in params]
    if unknown:
        raise GradInitError(f"not trainable parameters of the model: {unknown}", "scaled")
    if not scaled:
        raise GradInitError("no tensor selected for scaling", "scaled")
    # Unscaled trainable tensors still take part in the gradient norm and the virtual
    # step, so they enter the graph as leaves of their own (sharing the model's storage).
    base = {n: p.detach() if n in scaled else p.detach().requires_grad_() for n, p in params.items()}
    scales = torch.ones(len(scaled), device=next(iter(base.values())).device, requires_grad=True)
    return list(scaled), base, scales


class _Objective(nn.Module):
    """Lets ``functional_call`` substitute the model's tensors inside any loss function."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)

    def loss(self, tensors: Dict[str, torch.Tensor], batch) -> torch.Tensor:
        prefixed = {"model." + n: v for n, v in tensors.items()}
        # functional_call restores a module reachable under two names (fairseq's
        # --share-all-embeddings) only once and leaves a substituted tensor behind in
        # it; putting every module's own parameters back keeps the model intact.
        saved = [(m, dict(m._parameters)) for m in self.model.modules()]
        try:
            return functional_call(self, prefixed, (batch,), strict=False)
        finally:
            for module, params in saved:
                module._parameters.update(params)


def _iteration(
    t, objective, base, names, scales, s, s_tilde, settings, reduce, gamma, gamma_factor=None,
    expect_constraint=False,
):
    theta = _scaled(base, names, scales)
    flat = list(theta.values())
    whole_graph = settings.second_order == AUTOGRAD
    may_bind = math.isfinite(gamma) or gamma_factor is not None
    # "hvp" keeps the forward graph of S, run as micro-batches, whenever the constraint
    # may act: the Hessian-vector product then differentiates through it instead of
    # running S forward a second time.
    micro = not whole_graph and may_bind

    # Fused attention kernels have no double backward and the kernel is chosen at
    # forward time: use the math kernel whenever a second-order step may reuse this graph.
    with _math_attention() if may_bind else contextlib.nullcontext():
        if micro:
            parts = _micro_batch_losses(objective, theta, s, settings.hvp_chunks)
            loss_s = sum(parts)
        else:
            loss_s, _ = _mean_loss(objective.loss(theta, s))
    loss_s_value = _check_finite(loss_s, "loss on S", t, reduce)
    # "autograd" builds the double-backward graph only when the constraint branch is
    # expected (it ran last iteration); otherwise first order, and a second pass if needed.
    grads = torch.autograd.grad(
        loss_s, flat, retain_graph=may_bind, create_graph=whole_graph and expect_constraint, allow_unused=True
    )
    grads_with_graph = grads if whole_graph and expect_constraint else None
    grads = _dense([None if g is None else g.detach() for g in grads], flat)
    reduce(grads)
    grad_norm = _check_finite(_norm(grads, settings.norm_order), "gradient norm", t)

    if gamma_factor is not None:  # first iteration: the bound is set by this norm
        gamma = gamma_factor * grad_norm
    if grad_norm > gamma:
        # Constraint branch: a step on the scales that lowers ||g(S; theta_m)||_p.
        if whole_graph:
            if grads_with_graph is None:
                grads_with_graph = torch.autograd.grad(loss_s, flat, create_graph=True, allow_unused=True)
            norm = _norm([g for g in grads_with_graph if g is not None], settings.norm_order)
            (scales.grad,) = torch.autograd.grad(norm, scales)
        else:
            del loss_s
            v = _norm_direction(grads, settings.norm_order)
            scales.grad = _hessian_vector_product(parts, flat, scales, v)
        branch, loss_tilde_value = CONSTRAINT, None
    else:
        # Objective branch: the loss on S~ after one virtual step of the target
        # optimizer, the step direction A[g] held constant (paper, section 3.4).
        del loss_s, grads_with_graph  # frees the graph of S before the second forward
        parts = None
        direction = _step_direction(grads, settings.target, gamma)
        stepped = {n: p - settings.eta * d for (n, p), d in zip(theta.items(), direction)}
        loss_tilde, _ = _mean_loss(objective.loss(stepped, s_tilde))
        loss_tilde_value = _check_finite(loss_tilde, "loss on S~ after the virtual step", t, reduce)
        (scales.grad,) = torch.autograd.grad(loss_tilde, scales)
        branch = OBJECTIVE
    reduce([scales.grad])
    nan = math.nan
    return IterationRecord(t, branch, loss_s_value, loss_tilde_value, grad_norm, gamma, nan, nan, nan)


def _scaled(base, names, scales) -> Dict[str, torch.Tensor]:
    """theta_m: the selected tensors times their scales (in the graph), the others as they are."""
    theta = dict(base)
    for i, n in enumerate(names):
        theta[n] = scales[i] * base[n]
    return theta


def _norm_direction(grads, order) -> List[torch.Tensor]:
    """v = d||g||_p / dg: sign(g) for the l1 norm, g/||g||_2 for l2."""
    if order == 1:
        return [g.sign() for g in grads]
    l2 = _norm(grads, 2)
    return [g / l2 for g in grads]


def _micro_batch_losses(objective, theta, s, chunks) -> List[torch.Tensor]:
    """The loss on S as ``chunks`` terms, one per micro-batch of S, that add up to it.

    Each term keeps its own forward graph, so that ``_hessian_vector_product`` can free
    one micro-batch's graph before it builds the next one's double backward. A
    ``(total, size)`` loss is a sum over samples: each term is its total over the
    summed size. A plain mean loss is weighted by the micro-batch's share of the samples,
    which is exact if it is a mean over samples.
    """
    n = _batch_size(s)
    rows = _chunk_slices(n, chunks)
    outs = [objective.loss(theta, _index(s, r, n)) for r in rows]
    if all(isinstance(out, tuple) for out in outs):
        size = sum(out[1] for out in outs)
        return [out[0] / size for out in outs]
    return [_mean_loss(out)[0] * ((r.stop - r.start) / n) for out, r in zip(outs, rows)]


def _hessian_vector_product(parts, flat, scales, v) -> torch.Tensor:
    """d||g(S; theta_m)||_p / dm, exactly, one micro-batch of S at a time.

    With v = d||g||_p/dg held at its value, d||g||_p/dm = d(g . v)/dm: the Hessian-vector
    product H v seen through theta_m = m * base. g . v is linear in the loss, so it is the
    sum over the terms of ``_micro_batch_losses`` (whose forward graphs are reused). Only
    one micro-batch's double-backward graph is alive at a time, and each micro-batch's
    forward graph is freed once it has been used. ``parts`` is emptied.
    """
    total = torch.zeros_like(scales)
    while parts:
        part = parts.pop(0)
        # retain_graph: theta_m = m * base is shared by every micro-batch's graph; the
        # rest of this micro-batch's graph is freed when its tensors go out of scope.
        grads = torch.autograd.grad(part, flat, create_graph=True, retain_graph=True, allow_unused=True)
        dot = sum((g * d).sum() for g, d in zip(grads, v) if g is not None)
        if torch.is_tensor(dot) and dot.requires_grad:
            (grad,) = torch.autograd.grad(dot, scales, retain_graph=True, allow_unused=True)
            if grad is not None:
                total += grad.detach()
        del part, grads, dot  # this micro-batch's graph, before the next one's
    return total


def _chunk_slices(n: int, chunks: int) -> List[slice]:
    bounds = [round(i * n / min(chunks, n)) for i in range(min(chunks, n) + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def _mean_loss(out) -> Tuple[torch.Tensor, Any]:
    """(mean loss, size) from what ``loss_fn`` returned: a mean, or a (total, size) pair."""
    if isinstance(out, tuple):
        total, size = out
        return total / size, size
    return out, None


def _dense(grads, tensors) -> List[torch.Tensor]:
    """Gradients with zeros for the tensors the loss does not use (autograd gives None)."""
    return [torch.zeros_like(p) if g is None else g for p, g in zip(tensors, grads)]


def _norm(tensors: Sequence[torch.Tensor], order: int) -> torch.Tensor:
    if order == 1:
        return torch.stack([g.abs().sum() for g in tensors]).sum()
    return torch.stack([g.pow(2).sum() for g in tensors]).sum().sqrt()


def _step_direction(grads: Sequence[torch.Tensor], target: str, gamma: float) -> List[torch.Tensor]:
    """A[g] of the target optimizer's first step, as a constant (no graph).

    Adam: sign(g). SGD: gamma * g/||g||_2, the normalised step of paper 3.5 (a step of
    the constraint's length whatever the gradient's).
    """
    if target == ADAM:
        # Adam's first update is g / (|g| + eps), i.e. sign(g) (Balles & Hennig, 2018).
        return [g.detach().sign() for g in grads]
    l2 = _norm(grads, 2).detach()
    return [gamma * g.detach() / l2 for g in grads]


def _check_finite(value: torch.Tensor, what: str, t: int, reduce=None) -> float:
    """The value as a float; an error if it is nan or inf.

    With ``reduce`` the value is averaged over workers first, so that all of them see a
    nan together and stop together instead of waiting on each other.
    """
    if reduce is not None:
        value = value.detach().clone().reshape(1)
        reduce([value])
    number = value.item()
    if not math.isfinite(number):
        raise GradInitError(
            f"GradInit iteration {t}: the {what} is {number}; the model is left at its "
            "original initialization (try a smaller GradInit lr or eta)"
        )
    return number


def _math_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _batch_size(batch) -> int:
    if isinstance(batch, (str, bytes)):
        raise TypeError("not a batch")
    if torch.is_tensor(batch):
        return batch.size(0)
    values = batch.values() if isinstance(batch, dict) else batch
    for v in values:
        try:
            return _batch_size(v)
        except TypeError:
            continue
    raise TypeError("found no tensor in the batch to read its size from")


def _index(batch, rows: slice, n: int):
    if torch.is_tensor(batch):
        return batch[rows] if batch.dim() > 0 and batch.size(0) == n else batch
    if isinstance(batch, dict):
        return {k: _index(v, rows, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_index(v, rows, n) for v in batch)
    return batch
