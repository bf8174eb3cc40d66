"""What GradInit changed: per-tensor scales, weight magnitudes and gradient spread.

``fairseq-gradinit-report SAVE_DIR DATA_BIN`` rebuilds the model of a GradInit run as
fairseq-train built it before GradInit (same config, same seed: the initial weights bit
for bit), scales a copy with the run's ``gradinit_scales.json``, and compares the two on
a fixed set of training batches, in the manner of the paper's Figures 7 and 8:

* ``||W||_1 / numel``, the per-dimension weight magnitude of each scaled tensor;
* ``sigma(g)``, the paper's "averaged per-dimension standard deviation" of the gradient:
  for each of N batches the gradient of the mean loss w.r.t. the tensor, then for every
  element the standard deviation across the N batches (unbiased, N - 1), averaged over
  the elements.

It writes ``report.md`` (also printed), ``weights.png``, ``gradients.png`` and
``scales.png``. From Python::

    rows = collect(save_dir, data_bin, batches=8)
    write_markdown(rows, "report.md"); plot(rows, "plots/"); print(summary(rows))
"""
import argparse
import contextlib
import copy
import glob
import itertools
import json
import logging
import math
import os
import re
import sys
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from .core import GradInitError, apply_scales
from .hook import GRADINIT_CHECKPOINT, SCALES_JSON, read_scales

logger = logging.getLogger("fairseq_gradinit.report")

DEFAULT_BATCHES = 8
DEFAULT_MAX_TOKENS = 4096
#: Checkpoints that carry the run's config, best first: the GradInit checkpoint holds the
#: scaled initial weights themselves, so it can also be checked against the rebuild.
CHECKPOINTS = (GRADINIT_CHECKPOINT, "checkpoint_last.pt", "checkpoint_best.pt")

#: fairseq's module names -> (short tick label, words for the summary). In fairseq's
#: Transformer layers ``final_layer_norm`` is the LayerNorm of the FFN sublayer; the
#: stack-level ``layer_norm`` (pre-LN models only) is the real "final" LayerNorm.
PARTS = {
    "self_attn.q_proj": ("self q", "self-attention q"),
    "self_attn.k_proj": ("self k", "self-attention k"),
    "self_attn.v_proj": ("self v", "self-attention v"),
    "self_attn.out_proj": ("self out", "self-attention out"),
    "encoder_attn.q_proj": ("enc q", "encoder-attention q"),
    "encoder_attn.k_proj": ("enc k", "encoder-attention k"),
    "encoder_attn.v_proj": ("enc v", "encoder-attention v"),
    "encoder_attn.out_proj": ("enc out", "encoder-attention out"),
    "fc1": ("fc1", "FFN fc1"),
    "fc2": ("fc2", "FFN fc2"),
    "self_attn_layer_norm": ("self LN", "self-attention LayerNorm"),
    "encoder_attn_layer_norm": ("enc LN", "encoder-attention LayerNorm"),
    "final_layer_norm": ("ffn LN", "FFN LayerNorm"),
    "layer_norm": ("final LN", "final LayerNorm"),
    "embed_tokens": ("embed", "embedding"),
    "embed_positions": ("pos embed", "positional embedding"),
    "layernorm_embedding": ("embed LN", "embedding LayerNorm"),
    "output_projection": ("out proj", "output projection"),
    "project_in_dim": ("proj in", "input projection"),
    "project_out_dim": ("proj out", "output-dim projection"),
}
SIDES = {"encoder": "E", "decoder": "D"}
#: Attention projections in the paper's order (fairseq defines them k, v, q).
ATTENTION_ORDER = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "out_proj": 3}


class ReportError(Exception):
    """A problem with the inputs; the CLI prints it as one line and exits with 2."""


@dataclass
class Row:
    """One scaled tensor: its scale and the before/after statistics."""

    name: str  # parameter name, e.g. "decoder.layers.0.fc2.weight"
    label: str  # short tick label, e.g. "D0 fc2"
    group: str  # sublayer kind across layers, e.g. "decoder FFN fc2"
    kind: str  # "linear", "layernorm", "embedding" or "other" (the owning module)
    is_bias: bool
    scale: float
    weight_before: float  # ||W||_1 / numel of the initial tensor
    weight_after: float  # the same after GradInit's scale
    grad_std_before: float  # sigma(g) at the initial weights
    grad_std_after: float  # sigma(g) after GradInit

    def as_dict(self) -> Dict:
        return asdict(self)


def describe(name: str):
    """(tick label, group) of a parameter name: "E3 fc1", "encoder FFN fc1"."""
    match = re.match(r"^(encoder|decoder)\.(?:layers\.(\d+)\.)?(?:(.+)\.)?(\w+)$", name)
    if match is None:  # not a fairseq encoder/decoder tensor: the name says it best
        return name, re.sub(r"\.\d+\.", ".*.", name)
    side, layer, part, param = match.groups()
    if part is None or param not in ("weight", "bias"):
        # A module's own vector (e.g. a w_skip of transformer_wskip): name it by itself.
        part, param = ".".join(filter(None, (part, param))), "weight"
    short, words = PARTS.get(part, (part, part))
    label = f"{SIDES[side]}{layer if layer is not None else ''} {short}"
    group = f"{side} {words}"
    if param == "bias":
        label, group = label + " b", group + " bias"
    return label, group


def collect(
    save_dir: str,
    data_bin: str,
    batches: int = DEFAULT_BATCHES,
    max_tokens: Optional[int] = None,
    seed: Optional[int] = None,
) -> List[Row]:
    """The report's rows, one per scaled tensor in model order.

    Args:
        save_dir: the run's --save-dir (holds gradinit_scales.json and a checkpoint).
        data_bin: the binarized data the run trained on.
        batches: number N of training batches for sigma(g) (>= 2).
        max_tokens: tokens per batch; default the run's --max-tokens (or, without it,
            its --batch-size sentences), else 4096.
        seed: seed of the batch order; default the run's --seed.

    Raises:
        ReportError: missing files, or a JSON that does not fit the rebuilt model.
    """
    from fairseq import tasks, utils

    if batches < 2:
        raise ReportError(f"--batches must be >= 2 for a standard deviation (got {batches})")
    payload, ckpt_path = _find_inputs(save_dir)
    if not os.path.isdir(data_bin):
        raise ReportError(f"no data directory {data_bin}")
    scales = payload["scales"]
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file: say which one
        raise ReportError(f"cannot read {ckpt_path}: {e}") from None
    cfg = _run_config(state, ckpt_path, data_bin)

    # Exactly fairseq-train's order: seed, task, model (initialization draws from it).
    utils.set_torch_seed(cfg.common.seed)
    try:
        task = tasks.setup_task(cfg.task)
    except Exception as e:  # fairseq raises bare Exceptions for unreadable data dirs
        raise ReportError(f"cannot set up the run's task on {data_bin}: {e}") from None
    initial = task.build_model(cfg.model)
    _check_fits(scales, payload.get("shapes") or {}, initial, ckpt_path)
    scaled = copy.deepcopy(initial)
    apply_scales(scaled, scales)
    if os.path.basename(ckpt_path) == GRADINIT_CHECKPOINT:
        _compare_with_checkpoint(scaled, state["model"], ckpt_path)
    del state

    if max_tokens is None:
        max_tokens = cfg.dataset.max_tokens or (None if cfg.dataset.batch_size else DEFAULT_MAX_TOKENS)
    seed = cfg.common.seed if seed is None else seed
    samples = _training_batches(task, cfg, initial, batches, max_tokens, cfg.dataset.batch_size, seed)
    logger.info(
        f"{os.path.basename(ckpt_path)}: {len(scales)} scaled tensors; sigma(g) over "
        f"{len(samples)} training batches of <= {max_tokens or cfg.dataset.batch_size} "
        f"{'tokens' if max_tokens else 'sentences'} (seed {seed})"
    )
    criterion = task.build_criterion(cfg.criterion)
    names = _report_order([n for n, _ in initial.named_parameters() if n in scales])
    before = gradient_std(initial, criterion, samples, names)
    after = gradient_std(scaled, criterion, samples, names)

    params0, params1 = dict(initial.named_parameters()), dict(scaled.named_parameters())
    modules = dict(initial.named_modules())
    rows = []
    for name in names:
        label, group = describe(name)
        module_name, _, param = name.rpartition(".")
        rows.append(Row(
            name=name, label=label, group=group,
            kind=_kind(modules.get(module_name)), is_bias=param == "bias",
            scale=float(scales[name]),
            weight_before=_magnitude(params0[name]), weight_after=_magnitude(params1[name]),
            grad_std_before=before[name], grad_std_after=after[name],
        ))  # fmt: skip
    return rows


def gradient_std(model: nn.Module, criterion, samples: List[dict], names: List[str]) -> Dict[str, float]:
    """sigma(g) per tensor: mean over elements of the std across batches of the gradient.

    The gradient is that of the mean loss (criterion loss / sample_size) of each batch,
    in eval mode so that dropout does not add noise of its own. Welford's running
    variance keeps memory at two copies of the tensors whatever the number of batches.
    """
    params = dict(model.named_parameters())
    mean = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    m2 = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    was_training = model.training
    model.eval()
    try:
        for k, sample in enumerate(samples, 1):
            model.zero_grad(set_to_none=True)
            loss, sample_size, _ = criterion(model, sample)
            (loss / sample_size).backward()
            for n in names:
                grad = params[n].grad
                g = torch.zeros_like(mean[n]) if grad is None else grad.detach().double()
                delta = g - mean[n]
                mean[n] += delta / k
                m2[n] += delta * (g - mean[n])
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {n: (m2[n] / (len(samples) - 1)).sqrt().mean().item() for n in names}


def write_markdown(rows: List[Row], path: str) -> str:
    """Write the table (with a legend and the summary) to ``path``; returns the table."""
    table = markdown_table(rows)
    text = (
        "# What GradInit changed\n\n"
        "`scale`: GradInit's learned scale. `|W|_1/n`: mean absolute value of the tensor "
        "(||W||_1 / numel). `sigma(g)`: for every element, the standard deviation of its "
        "gradient (of the mean loss) across the training batches, averaged over the "
        "elements. `initial`: the model fairseq-train built; `GradInit`: after the scales.\n\n"
        f"{table}\n\n{summary(rows)}\n"
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return table


def markdown_table(rows: List[Row]) -> str:
    """One line per row: tensor, label, scale, |W|_1/n and sigma(g) before and after."""
    lines = [
        "| tensor | label | scale | \\|W\\|_1/n initial | \\|W\\|_1/n GradInit "
        "| sigma(g) initial | sigma(g) GradInit |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.label} | {r.scale:.4f} | {r.weight_before:.4g} | "
            f"{r.weight_after:.4g} | {r.grad_std_before:.4g} | {r.grad_std_after:.4g} |"
        )
    return "\n".join(lines)


def summary(rows: List[Row], top: int = 3) -> str:
    """The groups GradInit scaled down most, by mean scale over their tensors."""
    groups = defaultdict(list)
    for r in rows:
        groups[r.group].append(r.scale)
    means = sorted((sum(v) / len(v), g, len(v)) for g, v in groups.items())
    down = [(m, g, n) for m, g, n in means if m < 1][:top]
    if not down:
        if not means:
            return "GradInit scaled no tensor"
        m, g, _ = means[0]
        return f"GradInit scaled no group down (lowest mean scale: {g} x{_times(m)})"
    parts = [f"{g} x{_times(m)}" if n == 1 else f"{g} mean x{_times(m)} ({n} tensors)" for m, g, n in down]
    return "GradInit scaled down most: " + "; ".join(parts)


def plot(rows: List[Row], out_dir: str) -> List[str]:
    """weights.png, gradients.png (Figures 7/8 of the paper) and scales.png; returns paths."""
    # Figure + savefig, not pyplot: no GUI backend and no global state to disturb.
    from matplotlib.figure import Figure

    os.makedirs(out_dir, exist_ok=True)
    panels = [
        ("linear layers", [r for r in rows if r.kind == "linear" and not r.is_bias]),
        ("LayerNorm weights", [r for r in rows if r.kind == "layernorm" and not r.is_bias]),
    ]
    paths = []
    for filename, what, before, after in (
        ("weights.png", "|W|_1 / numel", "weight_before", "weight_after"),
        ("gradients.png", "sigma(g): per-element std over batches, averaged", "grad_std_before", "grad_std_after"),
    ):  # fmt: skip
        width = max(8.0, 0.25 * max(len(p) for _, p in panels))
        fig = Figure(figsize=(width, 8), dpi=100, layout="constrained")
        for ax, (title, panel) in zip(fig.subplots(2, 1), panels):
            ax.set_title(f"{title}: {what}")
            if not panel:
                ax.text(0.5, 0.5, "no scaled tensors of this kind", ha="center", transform=ax.transAxes)
                continue
            x = range(len(panel))
            values = [getattr(r, before) for r in panel] + [getattr(r, after) for r in panel]
            ax.plot(x, values[: len(panel)], "o-", label="initial")
            ax.plot(x, values[len(panel) :], "s--", label="GradInit")
            _log_y(ax, values)
            ax.set_xticks(list(x), [r.label for r in panel], rotation=90, fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        paths.append(_save(fig, out_dir, filename))

    fig = Figure(figsize=(max(8.0, 0.2 * len(rows)), 5), dpi=100, layout="constrained")
    ax = fig.subplots()
    colors = ["tab:blue" if r.scale < 1 else "tab:orange" for r in rows]
    # Bars grow from 1 (no change), so that scales of 0.98 and 1.02 are told apart.
    ax.bar(range(len(rows)), [r.scale - 1 for r in rows], bottom=1.0, color=colors)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [r.label for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("scale")
    ax.set_title("GradInit scales (blue: scaled down; 'b' = bias)")
    paths.append(_save(fig, out_dir, "scales.png"))
    return paths


def cli_main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="fairseq-gradinit-report",
        description="Compare a GradInit run's initial and scaled weights: table and plots.",
    )
    parser.add_argument("save_dir", help="the run's --save-dir")
    parser.add_argument("data_bin", help="the binarized data directory of the run")
    parser.add_argument("--out", help="output directory (default SAVE_DIR/gradinit_report)")
    parser.add_argument("--batches", type=int, default=DEFAULT_BATCHES, help="training batches for sigma(g)")
    parser.add_argument("--max-tokens", type=int, help="tokens per batch (default: the run's)")
    parser.add_argument("--seed", type=int, help="seed of the batch order (default: the run's)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.save_dir, "gradinit_report")

    with _console():
        created = not os.path.exists(out)
        try:
            _check_arguments(args)
            _find_inputs(args.save_dir)  # before --out is created, possibly inside it
            _check_writable(out)
            rows = collect(args.save_dir, args.data_bin, args.batches, args.max_tokens, args.seed)
            try:
                table = write_markdown(rows, os.path.join(out, "report.md"))
                with open(os.path.join(out, "rows.json"), "w") as f:
                    json.dump([r.as_dict() for r in rows], f, indent=1)
                paths = plot(rows, out)
            except OSError as e:
                raise ReportError(f"cannot write the report to {out}: {e.strerror or e}") from None
        except ReportError as e:
            if created:  # leave no empty output folder behind
                with contextlib.suppress(OSError):
                    os.rmdir(out)
            print(f"fairseq-gradinit-report: error: {e}", file=sys.stderr)
            sys.exit(2)
    print(table)
    print(summary(rows))
    print(f"wrote {os.path.join(out, 'report.md')}, rows.json, " + ", ".join(map(os.path.basename, paths)))


def _check_arguments(args) -> None:
    """Numeric flags in range, before any work is done."""
    if args.batches < 2:
        raise ReportError(f"--batches must be >= 2 for a standard deviation (got {args.batches})")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ReportError(f"--max-tokens must be >= 1 (got {args.max_tokens})")
    if args.seed is not None and not 0 <= args.seed < 2**32 - 1000:  # numpy seeds seed + epoch
        raise ReportError(f"--seed must be in [0, 2**32 - 1000) (got {args.seed})")


def _check_writable(out: str) -> None:
    """--out can be created and written (root ignores file modes: so write, not ask)."""
    probe = os.path.join(out, ".write-test")
    try:
        os.makedirs(out, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ReportError(f"cannot write to {out} (--out): {e.strerror or e}") from None


@contextlib.contextmanager
def _console():
    """The report's own lines on stderr, and little else; restores logging afterwards.

    fairseq logs every dataset it opens and matplotlib its font search; torch warns about
    fairseq 0.12's own calls. cli_main may be called from Python, hence the restore.
    """
    quiet = [logging.getLogger(name) for name in ("fairseq", "matplotlib")]
    saved = [(lg, lg.level) for lg in quiet] + [(logger, logger.level)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fairseq-gradinit-report: %(message)s"))
    propagate = logger.propagate
    for lg in quiet:
        lg.setLevel(logging.WARNING)
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")
            yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        for lg, level in saved:
            lg.setLevel(level)


def _find_inputs(save_dir: str):
    """(scales payload, checkpoint path) of a save dir, or a ReportError saying what is missing."""
    if not os.path.isdir(save_dir):
        raise ReportError(f"no save directory {save_dir}")
    json_path = os.path.join(save_dir, SCALES_JSON)
    if not os.path.exists(json_path):
        raise ReportError(f"no {SCALES_JSON} in {save_dir}: was the run made with --gradinit?")
    try:
        payload = read_scales(json_path)
    except GradInitError as e:
        raise ReportError(str(e)) from None
    found = [os.path.join(save_dir, c) for c in CHECKPOINTS if os.path.exists(os.path.join(save_dir, c))]
    found += sorted(glob.glob(os.path.join(save_dir, "checkpoint*.pt")))
    if not found:
        raise ReportError(f"no checkpoint (checkpoint_gradinit.pt, checkpoint_last.pt, ...) in {save_dir}")
    return payload, found[0]


def _run_config(state: Dict, path: str, data_bin: str):
    """The run's full config from a checkpoint, pointed at ``data_bin``."""
    from omegaconf import OmegaConf

    if state.get("cfg") is not None:
        # fairseq stores the model config of a legacy --arch as an argparse.Namespace.
        cfg = OmegaConf.create(state["cfg"], flags={"allow_objects": True})
    elif state.get("args") is not None:  # checkpoints of fairseq < 0.10
        from fairseq.dataclass.utils import convert_namespace_to_omegaconf

        cfg = convert_namespace_to_omegaconf(state["args"])
    else:
        raise ReportError(f"{path} holds no training config")
    OmegaConf.set_struct(cfg, False)
    cfg.task.data = data_bin
    # Rebuilding the model must not re-check training flags or re-read a
    # --gradinit-load file that may have moved since: the task only builds here.
    if "gradinit" in cfg.task:
        cfg.task.gradinit, cfg.task.gradinit_load = False, None
        if "gradinit_only" in cfg.task:
            cfg.task.gradinit_only = False
    return cfg


def _check_fits(scales: Dict[str, float], shapes: Dict, model: nn.Module, ckpt_path: str) -> None:
    params = dict(model.named_parameters())
    unknown = [n for n in scales if n not in params]
    wrong = [n for n in scales if n in params and n in shapes and list(params[n].shape) != shapes[n]]
    if unknown or wrong:
        names = (unknown or wrong)[:3]
        what = "names tensors not in" if unknown else "has other shapes than"
        raise ReportError(
            f"{SCALES_JSON} {what} the model rebuilt from {os.path.basename(ckpt_path)} and "
            f"the data: {', '.join(names)}{' ...' if len(unknown or wrong) > 3 else ''}"
        )


def _compare_with_checkpoint(scaled: nn.Module, weights: Dict, path: str) -> None:
    """Warn if the GradInit checkpoint's weights are not the rebuilt initial x scale."""
    differ = []
    for name, p in scaled.named_parameters():
        saved = weights.get(name)
        if saved is None:
            continue
        mine = p.detach().to(saved.dtype)
        if saved.dtype == torch.float32:
            same = torch.equal(mine, saved)
        else:  # fp16/bf16 runs scale an fp32 master copy, then round once more
            same = torch.allclose(mine.float(), saved.float(), rtol=1e-2, atol=1e-5)
        if not same:
            differ.append(name)
    if differ:
        logger.warning(
            f"warning: the weights in {path} differ from the rebuilt initial model x "
            f"{SCALES_JSON} in {len(differ)} tensors ({', '.join(differ[:3])}"
            f"{' ...' if len(differ) > 3 else ''}); the report shows the rebuilt ones. Were "
            "the seed, architecture or data changed, or the JSON edited?"
        )


def _training_batches(task, cfg, model, n, max_tokens, max_sentences, seed) -> List[dict]:
    """The first ``n`` batches of the training iterator (further epochs if one is short)."""
    from fairseq import utils

    subset = cfg.dataset.train_subset
    try:
        task.load_dataset(subset, epoch=1, combine=False)
    except Exception as e:  # translation raises FileNotFoundError, other tasks bare Exceptions
        raise ReportError(f"cannot load the training set '{subset}' from {cfg.task.data}: {e}") from None
    samples, per_epoch = [], None
    # As fairseq's trainer, sentences longer than a batch holds are skipped (not asserted).
    batch_iterator = getattr(task, "unchecked_batch_iterator", task.get_batch_iterator)
    limit = f" of at most {max_tokens} tokens (--max-tokens)" if max_tokens else ""
    none = ReportError(f"the training set '{subset}' gives no batches{limit}: are all its sentences longer?")
    for epoch in itertools.count(1):
        try:
            itr = batch_iterator(
                dataset=task.dataset(subset),
                max_tokens=max_tokens,
                max_sentences=max_sentences,
                max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions(), max_tokens),
                ignore_invalid_inputs=True,
                required_batch_size_multiple=cfg.dataset.required_batch_size_multiple,
                seed=seed,
                epoch=epoch,
                disable_iterator_cache=True,
            ).next_epoch_itr(shuffle=True)
        except IndexError:  # fairseq's batch_by_size when every sentence was filtered out
            raise none from None
        for sample in itr:
            if sample:  # fairseq yields {} for an empty shard
                samples.append(sample)
            if len(samples) == n:
                if per_epoch is not None:  # later epochs reshuffle the same sentences
                    logger.warning(
                        f"warning: one epoch of '{subset}' gives only {per_epoch} batches; "
                        f"the other {n - per_epoch} re-use its sentences (a smaller "
                        "--max-tokens gives more distinct batches)"
                    )
                return samples
        if not samples:
            raise none
        per_epoch = per_epoch or len(samples)


def _report_order(names: List[str]) -> List[str]:
    """Model order, but attention projections as q, k, v, out (fairseq defines k, v, q)."""

    def key(item):
        index, name = item
        match = re.match(r"^(.*attn)\.(q_proj|k_proj|v_proj|out_proj)\.", name)
        if match is None:
            return (index, 0, index)
        # All projections of one attention block sort at the block's first position.
        first = min(i for i, n in enumerate(names) if n.startswith(match.group(1) + "."))
        return (first, ATTENTION_ORDER[match.group(2)], index)

    return [name for _, name in sorted(enumerate(names), key=key)]


def _kind(module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "other"


def _magnitude(p: torch.Tensor) -> float:
    return p.detach().double().abs().mean().item()


def _times(factor: float) -> str:
    """Two decimals, or three where two would print a scale below 1 as "1.00"."""
    return f"{factor:.2f}" if f"{factor:.2f}" != "1.00" else f"{factor:.3f}"


def _log_y(ax, values) -> None:
    """Log y axis with plain numbers ("0.02", not "2 x 10^-2")."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    # Within a decade there is at most one major tick to read: label every minor tick
    # then; over wider ranges only the 2s and 5s, which stay legible.
    positive = [v for v in values if v > 0]
    narrow = bool(positive) and max(positive) < 10 * min(positive)

    def minor(v, _):
        mantissa = round(v / 10 ** math.floor(math.log10(v)), 6) if v > 0 else 0
        return f"{v:.3g}" if narrow or mantissa in (2, 5) else ""

    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _save(fig, out_dir: str, filename: str) -> str:
    path = os.path.join(out_dir, filename)
    fig.savefig(path)
    return path


if __name__ == "__main__":
    cli_main()
