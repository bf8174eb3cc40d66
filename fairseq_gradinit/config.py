"""The --gradinit flags: one dataclass, its defaults and where each default comes from.

Training-wide values that GradInit derives its defaults from (--max-tokens, --lr,
--optimizer, --save-dir, ...) are read from the training config through ``RunConfig``.
"""
import argparse
import ast
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from .core import ADAM, AUTOGRAD, HVP, SGD, GradInitError, GradInitSettings

#: fairseq --optimizer names and the first step they take (paper, section 3).
TARGET_OF_OPTIMIZER = {
    "adam": ADAM,
    "adamw": ADAM,
    "cpu_adam": ADAM,
    "fused_adam": ADAM,
    "sgd": SGD,
    "nag": SGD,
}

#: Default gamma for an SGD target: the paper's value for IWSLT'14 with SGD (section 4.2).
SGD_GAMMA = 1.0

#: Default gamma for an Adam target, as a multiple of the l1 gradient norm at the first
#: GradInit iteration. The l1 norm grows with the number of parameters (about 2.5e4 for
#: transformer_iwslt_de_en, 1.2e4 for a 6+6-layer 256-wide model), so no absolute bound
#: suits every model size. At 1.25 x the constraint only takes back growth of the norm
#: beyond a quarter (it acts in 1-6 of 80 iterations on Multi30k); binding it from the
#: start (the authors' 0.04 x, or 0.2 x) switched encoder sublayers off and training
#: stalled (docs/constraint.md). --gradinit-gamma-factor 0.04 is the authors' point.
ADAM_GAMMA_FACTOR = 1.25


@dataclass
class GradInitConfig(FairseqDataclass):
    gradinit: bool = field(
        default=False,
        metadata={"help": "learn the initialization with GradInit before the first update"},
    )
    gradinit_iters: int = field(
        default=780, metadata={"help": "GradInit iterations (the authors' IWSLT'14 setting: 780)"}
    )
    gradinit_optimizer: Optional[ChoiceEnum([ADAM, SGD])] = field(
        default=None,
        metadata={"help": "optimizer the initialization is tuned for; default: from --optimizer"},
    )
    gradinit_eta: Optional[float] = field(
        default=None,
        metadata={"help": "learning rate of the virtual first step; default: --lr"},
    )
    gradinit_gamma: Optional[float] = field(
        default=None,
        metadata={
            "help": "bound on the gradient norm (l1 for Adam, l2 for SGD); for SGD also the "
            "length of the virtual step gamma * g/||g||_2 (paper 3.5); default: 1 for SGD "
            "(paper); for Adam 1.25 x the l1 norm at the first iteration (docs/constraint.md)"
        },
    )
    gradinit_gamma_factor: Optional[float] = field(
        default=None,
        metadata={
            "help": "bound the gradient norm by this multiple of its value at the first "
            "iteration instead of an absolute --gradinit-gamma (not both); 0.04 is the "
            "authors' IWSLT'14 operating point (gamma 1000 for an initial l1 norm of "
            "about 2.5e4)"
        },
    )
    gradinit_lr: float = field(
        default=2.5e-3, metadata={"help": "Adam learning rate of the scales (tau)"}
    )
    gradinit_betas: str = field(
        default="(0.9, 0.98)", metadata={"help": "Adam betas of the scales"}
    )
    gradinit_grad_clip: float = field(
        default=1.0, metadata={"help": "clamp each scale's gradient to this (paper: 1)"}
    )
    gradinit_min_scale: float = field(
        default=0.01, metadata={"help": "lower bound of weight scales (paper: 0.01)"}
    )
    gradinit_max_scale: Optional[float] = field(
        default=None, metadata={"help": "upper bound of weight scales; default: none"}
    )
    gradinit_second_order: ChoiceEnum([HVP, AUTOGRAD]) = field(
        default=HVP,
        metadata={
            "help": "how the constraint branch differentiates the gradient norm, both exact: "
            "'hvp', a Hessian-vector product by double backward over micro-batches of S "
            "(--gradinit-hvp-chunks), or 'autograd', the double backward through the whole "
            "batch (the reference: more memory)"
        },
    )
    gradinit_hvp_chunks: int = field(
        default=2,
        metadata={"help": "micro-batches of S for --gradinit-second-order hvp (more: less memory)"},
    )
    gradinit_overlap: float = field(
        default=0.5,
        metadata={"help": "share of S's samples that S~ re-uses, in [0, 1) (paper: 0.5)"},
    )
    gradinit_max_tokens: Optional[int] = field(
        default=None,
        metadata={
            "help": "tokens per GradInit batch, split into S and S~ (2/3 of it each); "
            "default: --max-tokens"
        },
    )
    gradinit_load: Optional[str] = field(
        default=None,
        metadata={
            "help": "apply the scales of a gradinit_scales.json to the fresh model instead "
            "of running GradInit (same architecture and seed)"
        },
    )
    gradinit_only: bool = field(
        default=False,
        metadata={"help": "stop after GradInit and write <save-dir>/checkpoint_gradinit.pt"},
    )
    gradinit_wskip: bool = field(
        default=False,
        metadata={
            "help": "give the w_skip vectors of transformer_wskip* their own scales too "
            "(default off, as in the paper)"
        },
    )


#: Training-wide settings GradInit derives its defaults from, and where fairseq keeps
#: them. They are read from the training config the task config belongs to, never copied
#: into GradInitConfig: a task field named ``optimizer`` holding ``${optimizer._name}``
#: resolves to itself on omegaconf 2.0 (RecursionError at start-up with the official
#: fairseq 0.12.2), and a task of the user's own may use these names for something else.
TRAINING_SETTINGS = {
    "max_tokens": "dataset.max_tokens",
    "batch_size": "dataset.batch_size",
    "train_subset": "dataset.train_subset",
    "lr": "optimization.lr",
    "optimizer": "optimizer._name",
    "lr_scheduler": "lr_scheduler._name",
    "warmup_updates": "lr_scheduler.warmup_updates",
    "save_dir": "checkpoint.save_dir",
    "seed": "common.seed",
    "log_format": "common.log_format",
    "no_progress_bar": "common.no_progress_bar",
    "cpu": "common.cpu",
    "tpu": "common.tpu",
    "fp16": "common.fp16",
    "bf16": "common.bf16",
    "memory_efficient_fp16": "common.memory_efficient_fp16",
    "memory_efficient_bf16": "common.memory_efficient_bf16",
}


class RunConfig:
    """A task's --gradinit flags plus the training-wide settings of :data:`TRAINING_SETTINGS`.

    Works on a task's omegaconf config (the training config is its root) and on the
    argparse Namespace of a legacy task (which holds every training flag)::

        cfg = RunConfig(task.cfg)
        cfg.gradinit_iters, cfg.optimizer   # 780, 'adam'
    """

    def __init__(self, task_cfg):
        self._cfg = task_cfg

    def __getattr__(self, name):
        if name not in TRAINING_SETTINGS:
            return getattr(self._cfg, name)
        if isinstance(self._cfg, argparse.Namespace):
            return getattr(self._cfg, name, None)
        node = self._get_root()
        for key in TRAINING_SETTINGS[name].split("."):
            try:  # a scheduler without warmup, a missing ("???") value: None
                node = getattr(node, key)
            except Exception:
                return None
        return node

    def _get_root(self):
        """The whole training config."""
        if isinstance(self._cfg, argparse.Namespace):
            from fairseq.dataclass.utils import convert_namespace_to_omegaconf

            return convert_namespace_to_omegaconf(self._cfg)
        return self._cfg._get_root()


#: Settings that have a --gradinit-* flag of the same name.
FLAG_SETTINGS = {
    "iters", "optimizer", "eta", "gamma", "lr", "betas", "grad_clip",
    "min_scale", "max_scale", "overlap", "max_tokens", "load", "second_order",
    "gamma_factor", "hvp_chunks",
}  # fmt: skip


def flag(setting: str) -> str:
    """The command-line flag of a GradInit setting, for error messages."""
    return "--gradinit-" + setting.replace("_", "-")


def run_config(cfg) -> "RunConfig":
    """``cfg`` (a task config, or a legacy task's Namespace) as a :class:`RunConfig`."""
    return cfg if isinstance(cfg, RunConfig) else RunConfig(cfg)


def target_optimizer(cfg) -> str:
    cfg = run_config(cfg)
    if cfg.gradinit_optimizer is not None:
        return str(cfg.gradinit_optimizer)
    name = str(cfg.optimizer)
    if name not in TARGET_OF_OPTIMIZER:
        raise GradInitError(
            f"cannot tell which first step --optimizer {name} takes; "
            f"say --gradinit-optimizer adam or --gradinit-optimizer sgd",
            "optimizer",
        )
    return TARGET_OF_OPTIMIZER[name]


def settings_from_config(cfg) -> GradInitSettings:
    """GradInitSettings for a run, defaults filled in from the training flags."""
    cfg = run_config(cfg)
    target = target_optimizer(cfg)
    gamma, gamma_factor = cfg.gradinit_gamma, cfg.gradinit_gamma_factor
    if gamma is not None and gamma_factor is not None:
        raise GradInitError(
            "cannot be given together with --gradinit-gamma: the bound is either absolute "
            "(--gradinit-gamma) or relative to the first iteration's norm (--gradinit-gamma-factor)",
            "gamma_factor",
        )
    if gamma_factor is not None:
        gamma = math.inf
    elif gamma is None:
        gamma, gamma_factor = (SGD_GAMMA, None) if target == SGD else (math.inf, ADAM_GAMMA_FACTOR)
    return GradInitSettings(
        iters=cfg.gradinit_iters,
        eta=float(cfg.gradinit_eta if cfg.gradinit_eta is not None else _first(cfg.lr)),
        target=target,
        gamma=float(gamma),
        gamma_factor=gamma_factor,
        lr=cfg.gradinit_lr,
        betas=parse_betas(cfg.gradinit_betas),
        grad_clip=cfg.gradinit_grad_clip,
        min_scale=cfg.gradinit_min_scale,
        max_scale=math.inf if cfg.gradinit_max_scale is None else cfg.gradinit_max_scale,
        second_order=str(cfg.gradinit_second_order),
        hvp_chunks=cfg.gradinit_hvp_chunks,
    ).validate()


def gradinit_max_tokens(cfg) -> Tuple[Optional[int], Optional[int]]:
    """(max tokens, max sentences) of one GradInit batch, before its split into S and S~.

    By default one training batch, split into S and S~ of 2/3 of it each, so an
    objective iteration costs about 4/3 of a training batch's forward and backward
    passes. The paper computes g on a batch S of the training batch size (4.1.1, on
    CIFAR-10) and the authors' IWSLT'14 run drew S of about one training batch; S here
    is 2/3 of one, which on Multi30k learned scales as good as a 1.5 x batch (S = one
    training batch) did, in 40% less time (docs/defaults.md). --gradinit-max-tokens
    replaces the token limit.
    """
    cfg = run_config(cfg)
    if cfg.gradinit_max_tokens is not None and cfg.gradinit_max_tokens < 2:
        raise GradInitError(f"must be >= 2 (got {cfg.gradinit_max_tokens})", "max_tokens")
    tokens = cfg.gradinit_max_tokens
    if tokens is None and cfg.max_tokens is not None:
        tokens = cfg.max_tokens
    sentences = cfg.batch_size
    if tokens is None and sentences is None:
        raise GradInitError("neither --max-tokens nor --batch-size is set", "max_tokens")
    return tokens, sentences


def validate(cfg) -> None:
    """Check every flag that can be checked before the model exists."""
    cfg = run_config(cfg)
    if not 0 <= cfg.gradinit_overlap < 1:
        raise GradInitError(f"must be in [0, 1) (got {cfg.gradinit_overlap})", "overlap")
    if cfg.gradinit_eta is not None and not cfg.gradinit_eta > 0:
        raise GradInitError(f"must be > 0 (got {cfg.gradinit_eta})", "eta")
    if cfg.gradinit_gamma is not None and not cfg.gradinit_gamma > 0:
        raise GradInitError(f"must be > 0 (got {cfg.gradinit_gamma})", "gamma")
    gradinit_max_tokens(cfg)
    settings_from_config(cfg)


def parse_betas(text) -> Tuple[float, float]:
    try:
        betas = ast.literal_eval(text) if isinstance(text, str) else tuple(text)
        betas = tuple(float(b) for b in betas)
        if len(betas) == 2:
            return betas
    except (ValueError, SyntaxError, TypeError):
        pass
    raise GradInitError(f"must look like '(0.9, 0.98)' (got {text!r})", "betas")


def _first(lr) -> float:
    return float(lr[0]) if isinstance(lr, (list, tuple)) or hasattr(lr, "__getitem__") else float(lr)
