"""GradInit batches from a fairseq task: draw them, split each into S and S~."""
import itertools
from typing import Iterator, Optional, Tuple

import torch
from fairseq import utils

from .core import GradInitError, min_split_size, split_batch


def split_sample(sample: dict, overlap: float, pad: int) -> Tuple[dict, dict]:
    """Split a collated fairseq sample into (S, S~) sharing ``overlap`` of their sentences.

    ``ntokens`` and ``nsentences`` are recounted so that criteria normalise each part by
    its own size.
    """
    parts = split_batch(sample, overlap)
    for part in parts:
        part["nsentences"] = part["target"].size(0)
        part["ntokens"] = int(part["target"].ne(pad).sum())
    return parts


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
    for epoch in itertools.count(1):
        try:
            itr = task.get_batch_iterator(
                dataset=dataset,
                max_tokens=max_tokens,
                max_sentences=max_sentences,
                max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
                ignore_invalid_inputs=True,
                seed=seed,
                num_shards=num_shards,
                shard_id=shard_id,
                epoch=epoch,
                disable_iterator_cache=True,
            ).next_epoch_itr(shuffle=True)
        except AssertionError as e:  # fairseq's batching: a sentence longer than a batch
            raise GradInitError(f"{e}; give GradInit a larger batch", "max_tokens") from None
        batches = 0
        for sample in itr:
            if not sample:  # fairseq yields {} for a shard left without data
                continue
            batches += 1
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
            except GradInitError as e:
                raise GradInitError(f"{e}. {_limits(max_tokens, max_sentences, overlap)}", e.setting) from None
            yield parts
        if batches == 0:
            raise GradInitError(f"the training set '{task.gradinit_cfg.train_subset}' gives no batches")


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
