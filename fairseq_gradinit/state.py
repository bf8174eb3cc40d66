"""Where a run's GradInit scales live between processes: its checkpoints, and a JSON export.

The scales belong to the weights, so they travel in every checkpoint
(``task_state["gradinit"]``). fairseq's Trainer writes ``task.state_dict()`` into each
checkpoint but never loads ``task_state`` back, so when the weights come from a
checkpoint (resume, ``--restore-file``, ``--finetune-from-model``, the two-stage
``--gradinit-only`` flow) the task reads the ``task_state`` of the file fairseq loaded:
``loaded_checkpoint_path`` resolves it exactly as ``fairseq.checkpoint_utils.load_checkpoint``
does. Other ways in were weighed and dropped: a ``load_state_dict`` hook sees only
``state["model"]``; fairseq's ``get/set_checkpoint_dict`` task protocol is skipped with
``--reset-dataloader`` (the two-stage flow, ``--finetune-from-model``); wrapping
``checkpoint_utils.load_checkpoint_to_cpu`` would patch fairseq.

``<save-dir>/gradinit_scales.json`` is an export of the same payload, for
``--gradinit-load`` and ``fairseq-gradinit-report``; it is never read back as the run's
own scales. Example::

    path = loaded_checkpoint_path(cfg.checkpoint)   # .../checkpoint_last.pt
    payload = checkpoint_scales(path)               # {"scales": {...}, ...} or None
    write_json("save/gradinit_scales.json", payload)
"""
import contextlib
import json
import math
import os
from typing import Dict, Optional

import torch

from .core import GradInitError

STATE_KEY = "gradinit"


def loaded_checkpoint_path(ckpt, rank: int = 0, sharded: bool = False) -> str:
    """The checkpoint fairseq-train starts from (it may not exist: then a fresh run).

    ``ckpt`` is the run's ``checkpoint`` config (``--save-dir``, ``--restore-file``, ...);
    ``sharded`` is fairseq's FSDP ``--use-sharded-state``, one file per rank.
    """
    suffix = (ckpt.checkpoint_suffix or "") + (f"-shard{rank}" if sharded else "")
    if ckpt.restore_file != "checkpoint_last.pt":
        return ckpt.restore_file.replace(".pt", suffix + ".pt") if suffix else ckpt.restore_file
    path = os.path.join(ckpt.save_dir, f"checkpoint_last{suffix}.pt")
    if not os.path.exists(path):
        if getattr(ckpt, "continue_once", None) is not None:
            return ckpt.continue_once
        if ckpt.finetune_from_model is not None:
            return ckpt.finetune_from_model
    return path


def checkpoint_scales(path: str) -> Optional[Dict]:
    """The GradInit payload in a checkpoint's task state, or None if it holds none."""
    try:
        # mmap: only the pickled structure is read, not the tensors' bytes.
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # files of the legacy (non-zip) format cannot be mapped
        state = _load(path)
    except Exception as e:
        raise GradInitError(f"cannot read the task state of {path}: {e}") from None
    payload = (state.get("task_state") or {}).get(STATE_KEY) if isinstance(state, dict) else None
    return payload if isinstance(payload, dict) and isinstance(payload.get("scales"), dict) else None


def _load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise GradInitError(f"cannot read the task state of {path}: {e}") from None


def write_json(path: str, payload: Dict) -> None:
    """Write ``payload`` to ``path`` whole or not at all (no ``.tmp`` left on failure)."""
    def dump(tmp):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)

    write_atomically(path, dump)


def write_atomically(path: str, write) -> None:
    """``write(tmp_path)`` then rename to ``path``; a failed write leaves neither file.

    For checkpoints: torch.save reports a full disk as a RuntimeError from its zip writer.
    """
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        remove_quietly(tmp)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise GradInitError(f"cannot write {path}: {reason}") from None


def remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):  # absent, or beyond repair: nothing more to do
        os.remove(path)


def json_scales(path: str) -> Optional[Dict[str, float]]:
    """The scales of a JSON export if it is readable and well formed, else None."""
    try:
        with open(path) as f:
            payload = json.load(f)
    except (OSError, ValueError):
        return None
    scales = payload.get("scales") if isinstance(payload, dict) else None
    return scales if isinstance(scales, dict) else None


def check_payload(payload, path: str, min_scale: float = 0.0, max_scale: Optional[float] = None) -> Dict:
    """A --gradinit-load payload, checked as strictly as GradInit's own bounds.

    Scales must be finite real numbers (not booleans), weight scales >= ``min_scale``
    (and <= ``max_scale`` if set), bias scales (tensors named ``*.bias``) >= 0;
    ``shapes``, if present, must map tensor names to lists of sizes.
    """
    scales = payload.get("scales") if isinstance(payload, dict) else None
    if not isinstance(scales, dict) or not scales:
        raise GradInitError(f"{path} has no 'scales' mapping of tensor names to numbers", "load")
    for name, value in scales.items():
        number = _finite(value)
        if number is None:
            raise GradInitError(f"{path}: the scale of {name} is {json.dumps(value)}, not a finite number", "load")
        if name.rsplit(".", 1)[-1] == "bias":
            if number < 0:
                raise GradInitError(f"{path}: the bias scale of {name} is {number:g}; bias scales must be >= 0", "load")
        elif number < min_scale:
            raise GradInitError(
                f"{path}: the scale of {name} is {number:g}; weight scales must be >= "
                f"{min_scale:g} (--gradinit-min-scale)",
                "load",
            )
        elif max_scale is not None and number > max_scale:
            raise GradInitError(
                f"{path}: the scale of {name} is {number:g}; weight scales must be <= "
                f"{max_scale:g} (--gradinit-max-scale)",
                "load",
            )
    shapes = payload.get("shapes")
    if shapes is not None and not (
        isinstance(shapes, dict)
        and all(isinstance(s, list) and all(type(d) is int and d >= 0 for d in s) for s in shapes.values())
    ):
        raise GradInitError(f"{path}: 'shapes' must map tensor names to lists of sizes", "load")
    return payload


def _finite(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        return None
    return number if math.isfinite(number) else None
