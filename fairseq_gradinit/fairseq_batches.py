"""GradInit batches from a fairseq task: draw them, split each into S and S~."""
import itertools
from typing import Iterator, Optional, Tuple

import torch
from fairseq import utils

from .core import GradInitError, min_split_size, split_batch


def split_sample(sample: dict, overlap: float, pad: int) -> Tuple[dict, dict]:
    """Split a collated fairseq sample into (S, S~) sharing ``overlap`` of their sentences.

    Each part is recollated (see ``collated``), so that criteria normalise it by its own size.
    """
    return tuple(collated(part, pad) for part in split_batch(sample, overlap))


def collated(sample: dict, pad: int) -> dict:
    """A copy of ``sample`` as fairseq's collater would have made it of its sentences.

    Columns that are padding in every row are dropped (fairseq's LSTM asserts that the
    longest source fills the width), and ``ntokens`` and ``nsentences`` are recounted.
    Rows cut out of a batch (S and S~, the micro-batches of S) otherwise keep the
    whole batch's counts.
    """
    sample = dict(sample, net_input=dict(sample["net_input"]))
    _trim_padding(sample, pad)
    sample["nsentences"] = sample["target"].size(0)
    sample["ntokens"] = int(sample["target"].ne(pad).sum())
    return sample


def criterion_loss(criterion, pad: int):
    """``loss_fn`` for ``core.gradinit``: the criterion's (summed loss, sample size).

    The constraint step cuts S into micro-batches by rows and needs their sizes to add up
    to S's, so every sample is recollated first (a no-op on S and S~).

    Example::

        result = gradinit(model, criterion_loss(criterion, task.target_dictionary.pad()), pairs)
    """

    def loss_fn(model, sample):
        loss, sample_size, _ = criterion(model, collated(sample, pad))
        return loss, sample_size

    return loss_fn


def _trim_padding(part: dict, pad: int) -> None:
    """Drop all-padding columns; tensors read position by position are trimmed alike.

    Translation: the source alone, the decoder input with the target. Language
    modelling: the input with the target.
    """
    net_input = part["net_input"]
    groups = [["src_tokens"], ["prev_output_tokens", "target"]]
    if "prev_output_tokens" not in net_input:
        groups = [["src_tokens", "target"]]
    for group in groups:
        tensors = [net_input.get(k, part.get(k)) for k in group]
        if not all(torch.is_tensor(t) and t.dim() == 2 and not t.is_floating_point() for t in tensors):
            continue
        if len({t.size(1) for t in tensors}) != 1:
            continue
        keep = torch.stack([t.ne(pad).any(0) for t in tensors]).any(0)
        if bool(keep.all()):
            continue
        for k, t in zip(group, tensors):
            (net_input if k in net_input else part)[k] = t[:, keep]


def sample_pairs(
    task,
    model,
    max_tokens: Optional[int],
    max_sentences: Optional[int],
    overlap: float,
    seed: int,
    num_shards: int = 1,
    shard_id: int = 0,
) -> Iterator[Tuple[dict, dict]]:
    """Endless (S, S~) pairs from the task's training set, in the task's own batching.

    Each worker of a data-parallel run reads its own shard, as in training.
    """
    dataset = task.dataset(task.gradinit_cfg.train_subset)
    device = next(model.parameters()).device
    # The task's checks name the training flags; GradInit's batches have flags of their own.
    batch_iterator = getattr(task, "unchecked_batch_iterator", task.get_batch_iterator)
    for epoch in itertools.count(1):
        try:
            itr = batch_iterator(
                dataset=dataset,
                max_tokens=max_tokens,
                max_sentences=max_sentences,
                # As fairseq's trainer: sentences longer than a batch holds are skipped.
                max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions(), max_tokens),
                ignore_invalid_inputs=True,
                seed=seed,
                num_shards=num_shards,
                shard_id=shard_id,
                epoch=epoch,
                disable_iterator_cache=True,
            ).next_epoch_itr(shuffle=True)
        except AssertionError as e:  # fairseq's batching: a sentence longer than a batch
            raise GradInitError(f"{e}; give GradInit a larger batch", "max_tokens") from None
        batches, too_small = 0, None
        for sample in itr:
            if not sample:  # fairseq yields {} for a shard left without data
                continue
            if device.type == "cuda":
                sample = utils.move_to_cuda(sample, device=device)
            if not splittable(sample):
                raise GradInitError(
                    f"--task {_task_name(task)}: its batches cannot be split into S and S~ (GradInit "
                    "needs fairseq's usual batch: a dict with 'net_input' and a 'target' tensor); "
                    "train this task without --gradinit"
                )
            try:
                parts = split_sample(sample, overlap, task.target_dictionary.pad())
            except GradInitError as e:  # a batch too small to split: use the others
                too_small = e
                continue
            batches += 1
            yield parts
        if batches == 0:
            limits = _limits(max_tokens, max_sentences, overlap)
            if too_small is not None:
                raise GradInitError(f"{too_small}. {limits}", too_small.setting)
            raise GradInitError(
                f"the training set '{task.gradinit_cfg.train_subset}' gives no GradInit batch: "
                f"all its sentences are longer than a batch holds. {limits}",
                "max_tokens",
            )


def splittable(sample) -> bool:
    """A batch of one tensor row per sample under 'net_input' and 'target', as fairseq collates."""
    return (
        isinstance(sample, dict)
        and isinstance(sample.get("net_input"), dict)
        and torch.is_tensor(sample.get("target"))
        and sample["target"].dim() > 0
    )


def _task_name(task) -> str:
    return getattr(task, "gradinit_task_name", type(task).__name__)


def _limits(max_tokens: Optional[int], max_sentences: Optional[int], overlap: float) -> str:
    """Which flags set the size of a GradInit batch, and the least it must hold, for an error message."""
    limits = []
    if max_tokens is not None:
        limits.append(f"{max_tokens} tokens (--gradinit-max-tokens, default --max-tokens)")
    if max_sentences is not None:
        limits.append(f"{max_sentences} sentences (--batch-size)")
    return (
        "GradInit batches hold at most " + " and ".join(limits) + f"; S and S~ sharing {overlap:.0%} "
        f"of their sentences (--gradinit-overlap) need at least {min_split_size(overlap)} sentences"
    )
