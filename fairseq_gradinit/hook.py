"""Runs GradInit once, before the first update of a fresh fairseq run.

``GradInitTaskMixin`` goes in front of any fairseq task class (see task.py). It
checks the flags when the task is set up, notices when the model's weights come from
a checkpoint (resume, --restore-file, --finetune-from-model: GradInit must not run on
those), and at the first ``train_step`` of a fresh run hands the model, criterion and
training batches to ``core.gradinit``, then writes the scales into the weights (and
into the fp16 optimizer's fp32 master copy), the task state (so every checkpoint
carries them) and ``<save-dir>/gradinit_scales.json``.
"""
import json
import logging
import math
import os
import sys
from typing import Dict, Optional

import torch
import torch.distributed as dist
from fairseq import checkpoint_utils
from fairseq.logging import progress_bar
from omegaconf import OmegaConf

from . import config as gc
from .admin_init import admin_initialize_for_training, wants_admin
from .core import GradInitError, GradInitResult, gradinit
from .fairseq_batches import sample_pairs
from .models import wskip_parameter_names
from .selection import select_tensors
from .weights import fp32_model, scale_training_weights

logger = logging.getLogger("fairseq_gradinit")

STATE_KEY = "gradinit"
SCALES_JSON = "gradinit_scales.json"
GRADINIT_CHECKPOINT = "checkpoint_gradinit.pt"
LOG_INTERVAL = 10


class GradInitTaskMixin:
    """Adds GradInit to a fairseq task whose config includes ``config.GradInitConfig``."""

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        check_lr_scheduler(cfg)
        try:
            if cfg.gradinit:
                gc.validate(cfg)
            if cfg.gradinit_load:
                read_scales(cfg.gradinit_load)
        except GradInitError as e:
            fail(e)
        return super().setup_task(cfg, **kwargs)

    @property
    def gradinit_cfg(self):
        """The task config with the --gradinit flags (``args`` on fairseq's legacy tasks)."""
        cfg = getattr(self, "cfg", None)
        return cfg if cfg is not None else self.args

    def build_model(self, cfg, *args, **kwargs):
        model = super().build_model(cfg, *args, **kwargs)
        self._weights_from_checkpoint = False

        def loaded(module, incompatible_keys):
            self._weights_from_checkpoint = True

        model.register_load_state_dict_post_hook(loaded)
        return model

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if not getattr(self, "_first_step_seen", False):
            # Flag first: with --update-freq N this method runs N times per update.
            self._first_step_seen = True
            self._before_first_update(unwrap(model), criterion, optimizer, update_num)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def _before_first_update(self, model, criterion, optimizer, update_num):
        """Admin's w_skip profiling (--wskip-init admin), then GradInit, on fresh weights only."""
        cfg = self.gradinit_cfg
        fresh = update_num == 0 and not getattr(self, "_weights_from_checkpoint", False)
        if fresh and wants_admin(model):
            admin_initialize_for_training(self, model, optimizer)
        if not (cfg.gradinit or cfg.gradinit_load):
            return
        if fresh:
            self._run_gradinit(model, criterion, optimizer)
        else:
            self._keep_scales_of_checkpoint(update_num)

    def _run_gradinit(self, model, criterion, optimizer):
        try:
            if self.gradinit_cfg.gradinit_load:
                payload = load_scales(self.gradinit_cfg.gradinit_load, model, optimizer)
            else:
                result = run_gradinit(self, model, criterion, optimizer)
                payload = scales_payload(result, self.gradinit_cfg, model)
        except GradInitError as e:
            fail(e)
        self.state.merge_state_dict({STATE_KEY: payload})
        if is_master():
            _write_json(os.path.join(self.gradinit_cfg.save_dir, SCALES_JSON), payload)
        if self.gradinit_cfg.gradinit_only:
            path = os.path.join(self.gradinit_cfg.save_dir, GRADINIT_CHECKPOINT)
            if is_master():
                save_gradinit_checkpoint(path, self, model, criterion, optimizer)
            logger.info(f"--gradinit-only: wrote {path}; stopping before the first update")
            _exit_now()

    def _keep_scales_of_checkpoint(self, update_num):
        try:
            payload = _read_scales_json(self.gradinit_cfg.save_dir)
        except GradInitError as e:
            fail(e)
        if payload is not None:
            self.state.merge_state_dict({STATE_KEY: payload})
        logger.info(
            "GradInit not run: the weights come from a checkpoint "
            f"(update {update_num}); {'kept' if payload else 'no'} scales from {SCALES_JSON}"
        )


def run_gradinit(task, model, criterion, optimizer) -> GradInitResult:
    """GradInit on a fairseq model; the model (and fp16 master weights) end up scaled."""
    cfg = task.gradinit_cfg
    scaled = select_tensors(model, extra_names=_wskip_extra(model, cfg))
    settings = gc.settings_from_config(cfg)
    max_tokens, max_sentences = gc.gradinit_max_tokens(cfg)
    rank, world = _data_parallel()
    logger.info(
        f"GradInit: {len(scaled)} tensors scaled, {settings.iters} iterations, "
        f"target {settings.target} (eta {settings.eta:g}, l{settings.norm_order} gamma "
        f"{_gamma_text(settings)}), batches of {_batch_text(max_tokens, max_sentences)} "
        f"split with overlap {cfg.gradinit_overlap}; loss_S and loss_S~ in bits (base 2, "
        "as fairseq logs losses), gnorm of the loss in nats"
    )

    work = fp32_model(model)
    pairs = sample_pairs(
        task, work, max_tokens, max_sentences, cfg.gradinit_overlap, cfg.seed, world, rank
    )
    progress = progress_bar.progress_bar(
        _Sized(pairs, settings.iters),
        log_format=cfg.log_format,
        log_interval=LOG_INTERVAL,
        prefix="gradinit",
        default_log_format="simple" if cfg.no_progress_bar else "tqdm",
    )

    def log(record):
        progress.log(_stats(record), tag="gradinit", step=record.iteration)

    def loss_fn(m, sample):
        loss, sample_size, _ = criterion(m, sample)
        return loss / sample_size

    result = gradinit(
        work, loss_fn, progress, settings, scaled, log,
        all_reduce_mean=_all_reduce_mean if world > 1 else None,
    )  # fmt: skip

    scale_training_weights(model, optimizer, result.scales)
    if world > 1:
        _check_workers_agree(model, result.scales, world)
    last = result.history[-1]
    branches = sum(r.branch == "constraint" for r in result.history)
    if settings.iters % LOG_INTERVAL or isinstance(progress, progress_bar.TqdmProgressBar):
        # progress.log already printed the last iteration when it fell on the interval,
        # except on a tqdm bar, which only shows it in the postfix it erases.
        progress.print(_stats(last), tag="gradinit", step=settings.iters)
    logger.info(
        f"GradInit done in {result.seconds:.1f}s: {branches}/{settings.iters} iterations "
        f"in the constraint branch; scales min {last.scale_min:.3f} mean "
        f"{last.scale_mean:.3f} max {last.scale_max:.3f}"
    )
    return result


def _wskip_extra(model, cfg):
    """w_skip vectors (transformer_wskip*) get GradInit scales only with --gradinit-wskip."""
    if not getattr(cfg, "gradinit_wskip", False):
        return []
    return wskip_parameter_names(model)


def check_lr_scheduler(cfg) -> None:
    """fairseq's inverse_sqrt divides by --warmup-updates; say so before it crashes."""
    try:
        warmup = cfg.warmup_updates
    except Exception:  # a scheduler without warmup
        return
    if cfg.lr_scheduler == "inverse_sqrt" and warmup == 0:
        fail(
            "--lr-scheduler inverse_sqrt cannot run with --warmup-updates 0 (fairseq "
            "divides by it); for training without warmup use --lr-scheduler "
            "polynomial_decay --power 1 --total-num-update N (linear decay, the paper's "
            "schedule) or --lr-scheduler fixed"
        )


def fail(error) -> None:
    """End the run with a one-line message naming the flag, not a traceback."""
    message, setting = str(error), getattr(error, "setting", None)
    if setting in gc.FLAG_SETTINGS:
        if message.startswith(setting + " "):
            message = message[len(setting) + 1 :]
        message = f"{gc.flag(setting)} {message}" if message.startswith("must") else f"{gc.flag(setting)}: {message}"
    raise SystemExit(f"fairseq-gradinit: error: {message}")


def _exit_now() -> None:
    """End the process at once, with exit code 0, from inside fairseq's training loop.

    A SystemExit here would shut the interpreter down while fairseq's batch prefetch
    thread (a daemon thread of BufferedIterator) may be inside torch's C++ code, which
    then aborts the process ("terminate called without an active exception", exit -6;
    seen in CI). Nothing is left to clean up: the checkpoint and JSON are written.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def unwrap(model):
    """The model inside data-parallel wrappers (fairseq's and torch's)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def load_scales(path: str, model, optimizer) -> Dict:
    """Apply the scales of a gradinit_scales.json to a fresh model of the same architecture."""
    payload = read_scales(path)
    wskip = [n for n in wskip_parameter_names(model) if n in payload["scales"]]  # --gradinit-wskip runs
    expected = {n: list(model.get_parameter(n).shape) for n in select_tensors(model, extra_names=wskip)}
    shapes = payload.get("shapes") or {}
    missing = sorted(set(expected) - set(payload["scales"]))
    unknown = sorted(set(payload["scales"]) - set(expected))
    wrong = sorted(n for n in expected if n in shapes and shapes[n] != expected[n])
    if missing or unknown or wrong:
        details = "; ".join(
            f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
            for what, names in (("missing", missing), ("not in the model", unknown), ("other shape", wrong))
            if names
        )
        raise GradInitError(f"{path} does not fit this model ({details})", "load")
    scale_training_weights(model, optimizer, payload["scales"])
    logger.info(f"GradInit: applied {len(payload['scales'])} scales from {path}")
    return payload


def read_scales(path: str) -> Dict:
    """A gradinit_scales.json, checked for its form."""
    try:
        with open(path) as f:
            payload = json.load(f)
    except (OSError, ValueError) as e:
        raise GradInitError(f"cannot read {path}: {e}", "load") from None
    scales = payload.get("scales") if isinstance(payload, dict) else None
    if not isinstance(scales, dict) or not all(
        isinstance(v, (int, float)) and math.isfinite(v) for v in scales.values()
    ):
        raise GradInitError(f"{path} has no 'scales' mapping of tensor names to numbers", "load")
    return payload


def scales_payload(result: GradInitResult, cfg, model) -> Dict:
    settings = {k: _json_number(v) for k, v in result.settings.as_dict().items()}
    max_tokens, max_sentences = gc.gradinit_max_tokens(cfg)
    settings.update(overlap=cfg.gradinit_overlap, max_tokens=max_tokens, max_sentences=max_sentences)
    return {
        "scales": result.scales,
        "shapes": {n: list(model.get_parameter(n).shape) for n in result.scales},
        "settings": settings,
        "gamma": _json_number(result.history[0].gamma),
        "iterations": len(result.history),
        "constraint_iterations": sum(r.branch == "constraint" for r in result.history),
        "seconds": round(result.seconds, 3),
        "last_iteration": _stats(result.history[-1]),
    }


def save_gradinit_checkpoint(path, task, model, criterion, optimizer) -> None:
    """A normal fairseq checkpoint at update 0 that stock fairseq can start from."""
    root = task.gradinit_cfg._get_root()  # the full training config the task config belongs to
    state = {
        "args": None,
        "cfg": OmegaConf.to_container(root, resolve=True, enum_to_str=True),
        "model": model.state_dict(),
        "criterion": criterion.state_dict() if any(True for _ in criterion.parameters()) else None,
        "optimizer_history": [
            {
                "criterion_name": criterion.__class__.__name__,
                "optimizer_name": optimizer.__class__.__name__,
                "lr_scheduler_state": {"best": None},
                "num_updates": 0,
            }
        ],
        "task_state": task.state_dict(),
        "extra_state": {
            "train_iterator": {"epoch": 1, "iterations_in_epoch": 0, "shuffle": True, "version": 2},
            "metrics": {},
            "previous_training_time": 0,
        },
    }
    tmp = path + ".tmp"  # an interrupted write never looks like a finished checkpoint
    checkpoint_utils.torch_persistent_save(state, tmp)
    os.replace(tmp, path)


def is_master() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class _Sized:
    """An iterator with a length, so the progress bar can show i/N."""

    def __init__(self, iterator, length):
        self.iterator, self.length = iterator, length

    def __iter__(self):
        return iter(self.iterator)

    def __len__(self):
        return self.length


def _stats(record) -> Dict:
    """One iteration for the log; losses in bits like fairseq's (core computes in nats)."""
    stats = {
        "branch": record.branch,
        "loss_S": round(record.loss_s / math.log(2), 4),
        "loss_S~": "-" if record.loss_s_tilde is None else round(record.loss_s_tilde / math.log(2), 4),
        "gnorm": round(record.grad_norm, 4),
        "gamma": round(record.gamma, 4),
        "scale_min": round(record.scale_min, 4),
        "scale_mean": round(record.scale_mean, 4),
        "scale_max": round(record.scale_max, 4),
    }
    return stats


def _batch_text(max_tokens, max_sentences) -> str:
    limits = [f"{max_tokens} tokens" if max_tokens else "", f"{max_sentences} sentences" if max_sentences else ""]
    return " and ".join(x for x in limits if x) + " at most"


def _gamma_text(settings) -> str:
    if settings.gamma_factor is not None:
        return f"{settings.gamma_factor:g} x the first iteration's norm"
    return f"{settings.gamma:g}"


def _data_parallel():
    if dist.is_available() and dist.is_initialized():
        from fairseq.distributed import utils as dist_utils

        return dist_utils.get_data_parallel_rank(), dist_utils.get_data_parallel_world_size()
    return 0, 1


def _check_workers_agree(model, scales: Dict[str, float], world: int) -> None:
    """Every worker must start training from the same weights; compare them bit for bit."""
    from fairseq.distributed import utils as dist_utils

    with torch.no_grad():
        weights = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
        fingerprint = (tuple(scales.values()), weights.abs().sum().item(), weights.sum().item())
    gathered = [None] * world
    dist.all_gather_object(gathered, fingerprint, group=dist_utils.get_data_parallel_group())
    if any(other != gathered[0] for other in gathered):
        raise GradInitError("workers ended GradInit with different scales or weights")
    logger.info(f"GradInit: scales and weights identical on all {world} workers")


def _all_reduce_mean(tensors) -> None:
    """Average tensors over the data-parallel workers, in one message."""
    from fairseq.distributed import utils as dist_utils

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist_utils.all_reduce(flat, dist_utils.get_data_parallel_group())
    flat.div_(dist_utils.get_data_parallel_world_size())
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _json_number(value):
    return None if isinstance(value, float) and math.isinf(value) else value


def _write_json(path: str, payload: Dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def _read_scales_json(save_dir: str) -> Optional[Dict]:
    path = os.path.join(save_dir, SCALES_JSON)
    return read_scales(path) if os.path.exists(path) else None
