"""Admin's profiling initialization of w_skip (Liu et al. 2020, "Understanding the
Difficulty of Training Transformers"), inside the training run, before the first update.

Definition used (one stack at a time: encoder and decoder are accumulated separately).
Number the sublayers of a stack 1..N in forward order (layer 1 self-attention, [layer 1
encoder attention,] layer 1 FFN, layer 2 self-attention, ...). Let x_0 be the stack's
input, the embedding output that enters layer 1 (token embedding x embed_scale +
positions [+ layernorm_embedding]), and f_j the output of sublayer j's branch, the
tensor added to the weighted residual (attention output projection, fc2 output). Then

    w_skip_i = sqrt( Var[x_0] + sum_{j < i} Var[f_j] )          (every entry of the vector)

which is the paper's omega_i = sqrt(sum_{j<i} Var[f_j(x_{j-1})]) with the input
embedding counted as the first term, as in the authors' code (their profiling run starts
the accumulator with the variance of the embedding output, so w_skip_1 =
sqrt(Var[x_0])). Var[.] is one scalar per tensor: the population variance of all entries
(tokens x embed_dim channels) of the tensor, over the non-padding tokens of all profiling
batches pooled (the authors' code takes np.var of the flattened tensor of one batch,
padding included; padding positions are left out here because they carry no data).

The profiling is sequential, as Admin's: the branches f_j are measured with the w_skip of
all earlier sublayers already set to their Admin values (f_j depends on w_skip_{<j}
through its input; it does not depend on w_skip_j). The model runs in eval mode (no
dropout) without gradients; for each sublayer k in order, every batch is run forward up
to sublayer k's residual connection (then the pass is cut short), Var[f_k] is pooled over
the batches, and w_skip_{k+1} follows. That is N forward passes (most of them partial)
per batch; the result does not depend on the order of the batches.
"""
import itertools
import logging
import math
from typing import Callable, Dict, Iterable, List, Optional

import torch

from . import config as gc
from .fairseq_batches import sample_pairs
from .models.wskip_transformer import _StopForward, wskip_layers, WSKIP_PREFIX
from .weights import fp32_model, scale_training_weights


class _Moments:
    """Pooled count, sum and sum of squares (float64) of the entries of tensors."""

    def __init__(self):
        self.n, self.s, self.ss = 0, 0.0, 0.0

    def add(self, t: torch.Tensor, mask: Optional[torch.Tensor]):
        t = t.detach().double()  # T x B x C
        if mask is not None:  # B x T, True at padding
            t = t[~mask.transpose(0, 1).bool()]
        self.n += t.numel()
        self.s += float(t.sum())
        self.ss += float((t * t).sum())

    def var(self) -> float:
        mean = self.s / self.n
        return max(self.ss / self.n - mean * mean, 0.0)


def _default_forward(model, sample):
    return model(**sample["net_input"])


def admin_initialize(
    model: torch.nn.Module,
    batches_of_samples: Iterable[dict],
    forward_fn: Optional[Callable] = None,
) -> Dict[str, float]:
    """Set every w_skip of ``model`` by Admin's profiling; returns {parameter name: value}.

    Args:
        model: a model with w_skip layers (``transformer_wskip*``); modified in place
            (the w_skip vectors only).
        batches_of_samples: a few collated fairseq samples (a list; it is read once per
            sublayer).
        forward_fn: ``forward_fn(model, sample)`` runs the model on a sample; default
            ``model(**sample["net_input"])``.
    """
    forward_fn = forward_fn or _default_forward
    batches = list(batches_of_samples)
    if not batches:
        raise ValueError("admin_initialize needs at least one batch")
    layers = wskip_layers(model)
    if not layers:
        raise ValueError("the model has no w_skip layers")
    names = {id(p): n for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for layer in layers:
                for sub in layer.wskip_names:
                    getattr(layer, WSKIP_PREFIX + sub).fill_(1.0)
            order = _sublayer_order(model, layers, batches[0], forward_fn)
            values: Dict[str, float] = {}
            accumulated: Dict[str, float] = {}
            for layer, sub in order:
                first = layer.wskip_stack not in accumulated
                branch, embedding = _profile(model, layers, batches, forward_fn, (layer, sub), first)
                if first:
                    accumulated[layer.wskip_stack] = embedding.var()
                w = math.sqrt(accumulated[layer.wskip_stack])
                param = getattr(layer, WSKIP_PREFIX + sub)
                param.fill_(w)
                values[names[id(param)]] = w
                accumulated[layer.wskip_stack] += branch.var()
    finally:
        for layer in layers:
            layer.wskip_profiler = None
        model.train(was_training)
    return values


def _sublayer_order(model, layers, sample, forward_fn) -> List:
    """(layer, sublayer) in the order one forward pass calls them."""
    seen = []

    def record(layer, sub, branch, residual, mask):
        seen.append((layer, sub))

    for layer in layers:
        layer.wskip_profiler = record
    forward_fn(model, sample)
    for layer in layers:
        layer.wskip_profiler = None
    return seen


def _profile(model, layers, batches, forward_fn, target, first):
    """Pooled moments of sublayer ``target``'s branch (and of its residual if ``first``)."""
    branch, residual_moments = _Moments(), _Moments()

    def profiler(layer, sub, x, residual, mask):
        if (layer, sub) == target:
            branch.add(x, mask)
            if first:  # the first sublayer's residual is the stack's input x_0
                residual_moments.add(residual, mask)
            raise _StopForward

    for layer in layers:
        layer.wskip_profiler = profiler
    try:
        for sample in batches:
            try:
                forward_fn(model, sample)
            except _StopForward:
                continue
            raise RuntimeError(f"sublayer {target[1]} of a {target[0].wskip_stack} layer never ran")
    finally:
        for layer in layers:
            layer.wskip_profiler = None
    return branch, residual_moments


#: Training batches Admin's profiling runs on (the S half of GradInit-sized batches,
#: i.e. about one training batch each).
ADMIN_BATCHES = 3


def wants_admin(model) -> bool:
    return getattr(model, "wskip_init", "ones") == "admin" and bool(wskip_layers(model))


def admin_initialize_for_training(task, model, optimizer) -> Dict[str, float]:
    """Admin's profiling on ``ADMIN_BATCHES`` training batches, inside fairseq-train.

    Every data-parallel worker reads the same batches (shard 0 of 1), so all workers
    compute the same w_skip. Profiling runs in fp32 (on a copy of an fp16/bf16 model),
    and the values reach the fp16 optimizer's fp32 master copy too.
    """
    cfg = task.gradinit_cfg
    work = fp32_model(model)
    max_tokens, max_sentences = gc.gradinit_max_tokens(cfg)
    pairs = sample_pairs(task, work, max_tokens, max_sentences, cfg.gradinit_overlap, cfg.seed)
    batches = [s for s, _ in itertools.islice(pairs, ADMIN_BATCHES)]
    values = admin_initialize(work, batches)
    with torch.no_grad():  # scaling multiplies: start from the ones the model was built with
        for name in values:
            model.get_parameter(name).fill_(1.0)
    scale_training_weights(model, optimizer, values)
    logging.getLogger("fairseq_gradinit").info(
        f"Admin init (--wskip-init admin) on {len(batches)} batches: "
        + ", ".join(f"{n.replace('.' + WSKIP_PREFIX, ':')}={v:.3f}" for n, v in values.items())
    )
    return values
