"""Data that cannot give a training batch, refused with one line before fairseq trips on it.

Stock fairseq 0.12 meets these inside its data code, with a traceback: a missing data
directory (FileNotFoundError), an empty split ("cannot mmap an empty file"), a training
split whose every sentence is filtered out by length (an IndexError in batch_by_size), a
training split with no batch left ("The dataset is empty"; this includes 1-7 sentences,
since fairseq drops a batch smaller than --required-batch-size-multiple),
and a sentence longer than --max-tokens ("Sentences lengths should not exceed
max_tokens"). The task calls these checks around fairseq's own loading and batching.
"""
import glob
import os

import numpy as np

from .core import GradInitError

#: fairseq's FairseqTask.get_batch_iterator parameters, in order (for positional calls).
BATCH_ARGS = ("max_tokens", "max_sentences", "max_positions", "ignore_invalid_inputs", "required_batch_size_multiple")


def data_paths(cfg):
    from fairseq import utils

    data = getattr(cfg, "data", None)
    return utils.split_paths(data) if data else []


def check_data_dir(cfg) -> None:
    """Every data directory given to fairseq-train exists."""
    for path in data_paths(cfg):
        if "://" not in path and not os.path.isdir(path):
            raise GradInitError(f"no data directory {path} (fairseq-train's first argument: the binarized data)")


def check_split_files(cfg, split: str, epoch: int = 1) -> None:
    """A binarized split whose data files are all empty holds no sentences."""
    paths = data_paths(cfg)
    if not paths:
        return
    path = paths[(epoch - 1) % len(paths)]
    files = glob.glob(os.path.join(path, f"{split}.bin")) + glob.glob(os.path.join(path, f"{split}.*.bin"))
    if files and all(os.path.getsize(f) == 0 for f in files):
        raise GradInitError(
            f"the '{split}' split in {path} is empty ({os.path.basename(sorted(files)[0])} holds "
            "no sentences); binarize data with sentences in it"
        )


def split_name(task, dataset):
    return next((name for name, d in getattr(task, "datasets", {}).items() if d is dataset), None)


def _bound(args, kwargs):
    bound = dict(zip(BATCH_ARGS, args))
    bound.update({k: v for k, v in kwargs.items() if k in BATCH_ARGS})
    return bound


def check_sentences(task, dataset, *args, **kwargs) -> None:
    """Before batching: the training split has sentences the model and batches take.

    (fairseq's batch_by_size fails with an IndexError on none.)
    """
    split = split_name(task, dataset)
    if split != task.gradinit_cfg.train_subset:
        return
    n = len(dataset)
    if n == 0:
        raise GradInitError(f"the training set '{split}' is empty")
    if _usable(dataset, _bound(args, kwargs)) == 0:
        raise GradInitError(
            f"all {n} sentences of the training set '{split}' are longer than the model and "
            f"--max-tokens take (max positions {_bound(args, kwargs).get('max_positions')}); "
            "raise --max-tokens, --max-source-positions or --max-target-positions"
        )


def _usable(dataset, limits) -> int:
    positions = limits.get("max_positions")
    if positions is None:
        return len(dataset)
    return len(dataset.filter_indices_by_size(np.arange(len(dataset)), positions)[0])


def check_batches(task, dataset, itr, *args, **kwargs) -> None:
    """After batching: the training split gives at least one batch, else GradInitError why not."""
    split = split_name(task, dataset)
    if split != task.gradinit_cfg.train_subset or len(itr.frozen_batches) > 0:
        return
    limits = _bound(args, kwargs)
    kept = _usable(dataset, limits)
    multiple = limits.get("required_batch_size_multiple") or 1
    if kept < multiple:
        raise GradInitError(
            f"the training set '{split}' has {kept} usable sentences, fewer than "
            f"--required-batch-size-multiple {multiple}, and fairseq drops a batch smaller than "
            "that; pass --required-batch-size-multiple 1 (GradInit needs batches of 3 or more)"
        )
    raise GradInitError(
        f"the training set '{split}' gives no batches (at most {limits.get('max_tokens')} tokens, "
        f"{limits.get('max_sentences')} sentences per batch)"
    )


def too_long_message(task, dataset, *args, **kwargs) -> str:
    """fairseq's "Sentences lengths should not exceed max_tokens" as one line naming the flag."""
    split = split_name(task, dataset) or "?"
    max_tokens = _bound(args, kwargs).get("max_tokens")
    try:
        longest = int(np.max(dataset.num_tokens_vec(np.arange(len(dataset)))))
    except NotImplementedError:
        longest = max(dataset.num_tokens(i) for i in range(len(dataset)))
    advice = f"raise it to at least {longest}"
    if split != task.gradinit_cfg.train_subset:
        advice += ", or pass --skip-invalid-size-inputs-valid-test to skip such sentences"
    return (
        f"a sentence of the '{split}' set has {longest} tokens, more than a batch of "
        f"{max_tokens} tokens holds (--max-tokens; --max-tokens-valid for validation); {advice}"
    )
