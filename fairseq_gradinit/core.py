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
FINITE_DIFFERENCE, AUTOGRAD = "finite-difference", "autograd"

#: Size of the finite-difference step of the constraint branch, relative to the
#: parameters: the weights move by this fraction of their l2 norm.
FD_STEP = 1e-4


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
        (sign(g) for Adam, g/||g||_2 for SGD).
    gamma: bound on the gradient norm (gamma); above it a step lowers the norm.
    gamma_factor: if set, gamma is this multiple of the gradient norm at the first
        iteration instead (a bound that scales with the model; ``gamma`` is ignored).
    lr: Adam learning rate of the scales (tau).
    betas: Adam betas of the scales. Each branch keeps its own Adam moments.
    grad_clip: each scale's gradient is clamped to [-grad_clip, grad_clip].
    min_scale, max_scale: bounds of weight scales (alpha lower bound 0.01 in the paper).
    min_bias_scale: lower bound of bias scales (beta lower bound, 0 in the paper).
    second_order: how the constraint branch differentiates ||g||_p through g:
        "finite-difference" (default) takes a Hessian-vector product from one more
        first-order pass; "autograd" builds the double-backward graph (exact, about
        twice the memory, and attention runs its slow math kernel).
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
    second_order: str = FINITE_DIFFERENCE

    def validate(self) -> "GradInitSettings":
        """Raise ``GradInitError`` naming the first setting that is out of range."""
        checks = [
            ("iters", isinstance(self.iters, int) and self.iters >= 1, "an integer >= 1"),
            ("eta", _finite_positive(self.eta), "a finite number > 0"),
            ("target", self.target in (ADAM, SGD), f"'{ADAM}' or '{SGD}'"),
            ("gamma", self.gamma > 0 and not math.isnan(self.gamma), "> 0 (inf disables the bound)"),
            ("gamma_factor", self.gamma_factor is None or _finite_positive(self.gamma_factor), "a finite number > 0"),
            ("lr", _finite_positive(self.lr), "a finite number > 0"),
            ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
            ("grad_clip", self.grad_clip > 0, "> 0"),
            ("min_scale", _finite_positive(self.min_scale), "a finite number > 0"),
            ("max_scale", self.max_scale >= self.min_scale, f">= the min scale ({self.min_scale})"),
            ("min_bias_scale", 0 <= self.min_bias_scale <= self.max_scale, "in [0, max scale]"),
            ("second_order", self.second_order in (FINITE_DIFFERENCE, AUTOGRAD), f"'{FINITE_DIFFERENCE}' or '{AUTOGRAD}'"),
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
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss over the batch's samples.
            It is called with the model evaluated at substituted (scaled) tensors.
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
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    unknown = [n for n in scaled if n not in params]
    if unknown:
        raise GradInitError(f"not trainable parameters of the model: {unknown}", "scaled")
    if not scaled:
        raise GradInitError("no tensor selected for scaling", "scaled")

    names = list(scaled)
    # Unscaled trainable tensors still take part in the gradient norm and the virtual
    # step, so they enter the graph as leaves of their own (sharing the model's storage).
    base = {n: p.detach() if n in scaled else p.detach().requires_grad_() for n, p in params.items()}
    device = next(iter(base.values())).device
    scales = torch.ones(len(names), device=device, requires_grad=True)
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
    theta = dict(base)
    for i, n in enumerate(names):
        theta[n] = scales[i] * base[n]
    flat = list(theta.values())
    exact = settings.second_order == AUTOGRAD

    # Fused attention kernels have no double backward and the kernel is chosen at
    # forward time: use the math kernel whenever the autograd constraint step may follow.
    with _math_attention() if exact and math.isfinite(gamma) else contextlib.nullcontext():
        loss_s = objective.loss(theta, s)
    loss_s_value = _check_finite(loss_s, "loss on S", t, reduce)
    # The double-backward graph is built only when the constraint branch is expected
    # (it ran last iteration); otherwise first order, and a second pass if needed.
    grads = torch.autograd.grad(
        loss_s, flat, retain_graph=exact, create_graph=exact and expect_constraint, allow_unused=True
    )
    grads_with_graph = grads if exact and expect_constraint else None
    grads = _dense([None if g is None else g.detach() for g in grads], flat)
    reduce(grads)
    grad_norm = _check_finite(_norm(grads, settings.norm_order), "gradient norm", t)

    if gamma_factor is not None:  # first iteration: the bound is set by this norm
        gamma = gamma_factor * grad_norm
    if grad_norm > gamma:
        # Constraint branch: a step on the scales that lowers ||g(S; theta_m)||_p.
        if exact:
            if grads_with_graph is None:
                grads_with_graph = torch.autograd.grad(loss_s, flat, create_graph=True, allow_unused=True)
            norm = _norm([g for g in grads_with_graph if g is not None], settings.norm_order)
            (scales.grad,) = torch.autograd.grad(norm, scales)
        else:
            del loss_s
            hv = _hessian_vector_product(objective, theta, grads, s, settings.norm_order, reduce)
            scales.grad = torch.stack([(hv[n] * base[n]).sum() for n in names]).to(scales.dtype)
        branch, loss_tilde_value = CONSTRAINT, None
    else:
        # Objective branch: the loss on S~ after one virtual step of the target
        # optimizer, the step direction A[g] held constant (paper, section 3.4).
        del loss_s, grads_with_graph  # frees the graph of S before the second forward
        direction = _step_direction(grads, settings.target)
        stepped = {n: p - settings.eta * d for (n, p), d in zip(theta.items(), direction)}
        loss_tilde = objective.loss(stepped, s_tilde)
        loss_tilde_value = _check_finite(loss_tilde, "loss on S~ after the virtual step", t, reduce)
        (scales.grad,) = torch.autograd.grad(loss_tilde, scales)
        branch = OBJECTIVE
    reduce([scales.grad])
    nan = math.nan
    return IterationRecord(t, branch, loss_s_value, loss_tilde_value, grad_norm, gamma, nan, nan, nan)


def _hessian_vector_product(objective, theta, grads, s, order, reduce) -> Dict[str, torch.Tensor]:
    """H v for v = d||g||_p / dg, by a forward difference of gradients.

    The gradient of ||g(theta_m)||_p w.r.t. scale i is (H v)_i . base_i (theta_i =
    m_i base_i, H symmetric), and H v ~ (g(theta + eps v) - g(theta)) / eps: one more
    first-order pass on S instead of a double backward through it. v is sign(g) for
    the l1 norm and g / ||g||_2 for l2; eps moves theta by FD_STEP of its l2 norm.
    """
    point = {n: p.detach() for n, p in theta.items()}
    if order == 1:
        v = [g.sign() for g in grads]
    else:
        l2 = _norm(grads, 2)
        v = [g / l2 for g in grads]
    eps = FD_STEP * _norm(list(point.values()), 2) / _norm(v, 2).clamp_min(1e-30)
    shifted = {n: (p + eps * d).requires_grad_() for (n, p), d in zip(point.items(), v)}
    leaves = list(shifted.values())
    shifted_grads = _dense(torch.autograd.grad(objective.loss(shifted, s), leaves, allow_unused=True), leaves)
    reduce(shifted_grads)
    return {n: (g2 - g) / eps for n, g, g2 in zip(point, grads, shifted_grads)}


def _dense(grads, tensors) -> List[torch.Tensor]:
    """Gradients with zeros for the tensors the loss does not use (autograd gives None)."""
    return [torch.zeros_like(p) if g is None else g for p, g in zip(tensors, grads)]


def _norm(tensors: Sequence[torch.Tensor], order: int) -> torch.Tensor:
    if order == 1:
        return torch.stack([g.abs().sum() for g in tensors]).sum()
    return torch.stack([g.pow(2).sum() for g in tensors]).sum().sqrt()


def _step_direction(grads: Sequence[torch.Tensor], target: str) -> List[torch.Tensor]:
    """A[g] of the target optimizer's first step, as a constant (no graph)."""
    if target == ADAM:
        # Adam's first update is g / (|g| + eps), i.e. sign(g) (Balles & Hennig, 2018).
        return [g.detach().sign() for g in grads]
    l2 = _norm(grads, 2).detach()
    return [g.detach() / l2 for g in grads]


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
