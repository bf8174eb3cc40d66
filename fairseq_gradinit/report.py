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
    write_markdown(rows, "report.md"); plot(rows, "plots/", run_info(save_dir, 8))
    print(summary(rows))
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


@dataclass
class RunInfo:
    """What the plots' titles say about the run; from ``run_info``."""

    name: str  # the save dir's name
    target: str  # the optimizer GradInit tuned for: "adam" or "sgd"
    iterations: int
    constraint_iterations: Optional[int] = None
    batches: Optional[int] = None  # training batches behind sigma(g)

    def title(self) -> str:
        target = {"adam": "Adam", "sgd": "SGD"}.get(self.target, self.target)
        branch = (
            "" if self.constraint_iterations is None
            else f", {self.constraint_iterations} in the constraint branch"
        )
        return f"{self.name}: GradInit for {target}, {self.iterations} iterations{branch}"


def run_info(save_dir: str, batches: Optional[int] = None) -> RunInfo:
    """The RunInfo of a save dir, from its gradinit_scales.json."""
    payload, _ = _find_inputs(save_dir)
    settings = payload.get("settings") or {}
    return RunInfo(
        name=os.path.basename(os.path.normpath(save_dir)),
        target=str(settings.get("target", "?")),
        iterations=int(payload.get("iterations") or settings.get("iters") or 0),
        constraint_iterations=payload.get("constraint_iterations"),
        batches=batches,
    )


#: The figures: file name -> (row attribute before, after, y-axis label, what it shows).
CURVES = {
    "weights.png": (
        "weight_before", "weight_after",
        "mean |w| = ||W||_1 / numel",
        "weight magnitude per tensor",
    ),
    "gradients.png": (
        "grad_std_before", "grad_std_after",
        "sigma(g), loss in nats/token",
        "gradient spread per tensor: std over {batches} training batches, mean over elements",
    ),
}
INITIAL, GRADINIT = "tab:blue", "tab:orange"


def plot(rows: List[Row], out_dir: str, run: Optional[RunInfo] = None) -> List[str]:
    """weights.png, gradients.png (Figures 7/8 of the paper) and scales.png; returns paths."""
    os.makedirs(out_dir, exist_ok=True)
    return [_save(fig, out_dir, name) for name, fig in figures(rows, run).items()]


def figures(rows: List[Row], run: Optional[RunInfo] = None) -> Dict:
    """The report's matplotlib Figures by file name (``plot`` saves them).

    weights.png and gradients.png: one panel for linear layers and embeddings, one for
    LayerNorm weights; x is the tensor (encoder then decoder, a dashed line between them),
    y the statistic, initial and after GradInit. scales.png: one heat map per stack
    (rows: sublayer kind, columns: layer), so that hundreds of tensors stay legible.
    """
    # Figure, not pyplot: no GUI backend and no global state to disturb.
    from matplotlib.figure import Figure

    run = run or RunInfo(name="GradInit run", target="?", iterations=0)
    heading = run.title() if run.iterations else run.name
    panels = [
        ("linear layers and embeddings", [r for r in rows if r.kind in ("linear", "embedding") and not r.is_bias]),
        ("LayerNorm weights", [r for r in rows if r.kind == "layernorm" and not r.is_bias]),
    ]
    shown = sum(len(p) for _, p in panels)
    left_out = _left_out(rows, panels)
    out = {}
    for filename, (before, after, ylabel, what) in CURVES.items():
        width = min(16.0, max(9.0, 0.13 * max(len(p) for _, p in panels)))
        fig = Figure(figsize=(width, 9), dpi=100, layout="constrained")
        note = (f"\n{shown} of {len(rows)} scaled tensors shown; not shown: {left_out} (their scales "
                "are in scales.png)") if left_out else ""
        fig.suptitle(f"{heading}\n{what.format(batches=run.batches or 'N')}{note}", fontsize=11)
        for ax, (title, panel) in zip(fig.subplots(2, 1), panels):
            ax.set_title(title, fontsize=11)
            if not panel:
                ax.text(0.5, 0.5, "no scaled tensors of this kind", ha="center", transform=ax.transAxes)
                ax.set_xlabel("tensor")
                ax.set_ylabel(ylabel)
                continue
            initial, final = [getattr(r, before) for r in panel], [getattr(r, after) for r in panel]
            # One line per stack: the last encoder and first decoder tensor are not neighbours.
            for k, (start, stop) in enumerate(_stack_spans(panel)):
                x = list(range(start, stop))
                ax.plot(x, initial[start:stop], "o-", color=INITIAL, markersize=3.5, linewidth=1,
                        label=None if k else "initial (fairseq)")
                ax.plot(x, final[start:stop], "s--", color=GRADINIT, markersize=3.5, linewidth=1,
                        label=None if k else "after GradInit")
            log = _y_axis(ax, initial + final)
            ax.set_ylabel(ylabel + (" (log scale)" if log else ""))
            _tensor_ticks(ax, panel)
            _stack_divider(ax, panel)
            ax.grid(True, which="major", alpha=0.35)
            ax.grid(True, which="minor", axis="y", alpha=0.15)
            ax.legend(loc="best", fontsize=9)
        out[filename] = fig
    out["scales.png"] = _scales_figure(rows, heading)
    return out


def _left_out(rows: List[Row], panels) -> str:
    shown = {id(r) for _, p in panels for r in p}
    counts = defaultdict(int)
    for r in rows:
        if id(r) not in shown:
            counts["biases" if r.is_bias else f"{r.kind} tensors"] += 1
    return ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))


def _tensor_ticks(ax, panel: List[Row]) -> None:
    """One tick label per tensor ("E3 fc1"), thinned so that labels never overlap."""
    every = max(1, math.ceil(len(panel) / 120))
    ticks = list(range(0, len(panel), every))
    ax.set_xticks(ticks, [panel[i].label for i in ticks], rotation=90, fontsize=7)
    ax.set_xlim(-0.6, len(panel) - 0.4)  # no empty margin before the first tensor
    ax.set_xlabel("tensor (E = encoder, D = decoder, then the layer; 'self'/'enc' = self-/encoder-attention)")


def _stack_spans(panel: List[Row]):
    """(start, stop) index ranges of consecutive rows of the same stack."""
    spans, start = [], 0
    for i in range(1, len(panel) + 1):
        if i == len(panel) or panel[i].name.split(".", 1)[0] != panel[start].name.split(".", 1)[0]:
            spans.append((start, i))
            start = i
    return spans


def _stack_divider(ax, panel: List[Row]) -> None:
    """A dashed line between the last encoder and the first decoder tensor, both named."""
    sides = [r.name.split(".", 1)[0] for r in panel]
    if "encoder" not in sides or "decoder" not in sides:
        return
    first = sides.index("decoder")
    ax.axvline(first - 0.5, color="black", linestyle=":", linewidth=1.2, gid="stack-divider")
    for x, text, ha in ((first - 0.7, "encoder", "right"), (first - 0.3, "decoder", "left")):
        ax.text(x, 0.98, text, transform=ax.get_xaxis_transform(), ha=ha, va="top", fontsize=9,
                fontweight="bold", bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))


def _y_axis(ax, values) -> bool:
    """A log axis with ticks at 1, 2, 5 x 10^k where the values span a decade or more,
    else a linear one (a log axis over 0.9-1.15 shows one or two ticks). Returns log."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    positive = [v for v in values if v > 0]
    if positive and max(positive) >= 10 * min(positive) and len(positive) == len(values):
        ax.set_yscale("log")
        decades = math.log10(max(positive) / min(positive))
        subs = (1.0, 2.0, 3.0, 5.0, 7.0) if decades <= 2 else (1.0, 2.0, 5.0) if decades < 4 else (1.0,)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=[k for k in range(1, 10) if k not in subs]))
        ax.yaxis.set_minor_formatter(NullFormatter())
        return True
    ax.yaxis.set_major_locator(MaxNLocator(nbins=8))
    low, high = min(values), max(values)
    pad = 0.08 * (high - low or abs(high) or 1.0)
    ax.set_ylim(low - pad, high + pad)
    return False


def _position(row: Row):
    """(stack, layer or None, sublayer label) of a row: ("encoder", 3, "fc1 b")."""
    match = re.match(r"^(encoder|decoder)\.(?:layers\.(\d+)\.)?", row.name)
    if match is None:
        return "model", None, row.label
    side, layer = match.group(1), match.group(2)
    prefix = f"{SIDES[side]}{'' if layer is None else layer} "
    part = row.label[len(prefix):] if row.label.startswith(prefix) else row.label
    return side, None if layer is None else int(layer), part


def _scales_figure(rows: List[Row], heading: str):
    """Heat maps of the scales, one per stack: rows sublayer kinds, columns layers."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    stacks = defaultdict(list)
    for r in rows:
        stacks[_position(r)[0]].append(r)
    names = [s for s in ("encoder", "decoder", "model") if s in stacks]
    grids = []
    for side in names:
        parts, layers, cells = [], [], {}
        for r in stacks[side]:
            _, layer, part = _position(r)
            if part not in parts:
                parts.append(part)
            column = "-" if layer is None else str(layer)
            if column not in layers:
                layers.append(column)
            cells[(part, column)] = r.scale
        # Layer columns in order, the stack's own tensors (embeddings, final LN) first.
        layers.sort(key=lambda c: -1 if c == "-" else int(c))
        grids.append((side, parts, layers, cells))

    if not grids:
        fig = Figure(figsize=(8.0, 4.0), dpi=100, layout="constrained")
        fig.suptitle(heading, fontsize=12)
        fig.subplots().text(0.5, 0.5, "no scaled tensors", ha="center")
        return fig
    scales = [r.scale for r in rows]
    low, high = min(min(scales), 0.99), max(max(scales), 1.01)
    norm = TwoSlopeNorm(vcenter=1.0, vmin=low, vmax=high)
    tallest = max((len(p) for _, p, _, _ in grids), default=1)
    widest = sum(len(c) for _, _, c, _ in grids) or 1
    fig = Figure(
        figsize=(
            min(18.0, max(8.0, 0.55 * widest + 2.5 * len(grids))),
            min(30.0, max(5.0, 0.28 * tallest + 2.2)),
        ),
        dpi=100,
        layout="constrained",
    )
    fig.suptitle(f"{heading}\nGradInit scale of every scaled tensor (weights = scale x initial tensor)",
                 fontsize=12)
    ratios = [max(3, len(columns)) for _, _, columns, _ in grids]
    axes = fig.subplots(1, len(grids), width_ratios=ratios, squeeze=False)[0]
    image = None
    for ax, (side, parts, layers, cells) in zip(axes, grids):
        data = np.full((len(parts), len(layers)), np.nan)
        for (part, column), value in cells.items():
            data[parts.index(part), layers.index(column)] = value
        image = ax.imshow(data, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
        ax.set_facecolor("0.9")  # cells without a scaled tensor
        if len(layers) <= 20:  # numbers in the cells while they fit
            for (i, j), value in np.ndenumerate(data):
                if not np.isnan(value):
                    dark = abs(norm(value) - 0.5) > 0.35
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center",
                            fontsize=7 if len(layers) <= 12 else 5.5, color="white" if dark else "black")
        ax.set_xticks(range(len(layers)), ["stack" if c == "-" else c for c in layers], fontsize=8)
        ax.set_yticks(range(len(parts)), parts, fontsize=8)
        ax.set_xlabel("layer" if side != "model" else "")
        ax.set_title(side, fontsize=11)
    axes[0].set_ylabel("tensor of the layer ('b' = bias)")
    fig.supxlabel("column 'stack': the stack's embeddings and own LayerNorm; grey: no scaled tensor there",
                  fontsize=9)
    bar = fig.colorbar(image, ax=list(axes), shrink=0.9, pad=0.01)
    bar.set_label("scale (blue < 1: scaled down; red > 1: scaled up)")
    return fig


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
                paths = plot(rows, out, run_info(args.save_dir, args.batches))
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


def _save(fig, out_dir: str, filename: str) -> str:
    path = os.path.join(out_dir, filename)
    fig.savefig(path)
    return path


if __name__ == "__main__":
    cli_main()
