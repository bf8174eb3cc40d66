#!/usr/bin/env python3
"""Stability sweep over learning rate x Adam beta2 (the paper's Fig. 4).

    python examples/iwslt14/sweep.py --method gradinit-adam \
        --lrs 5e-4,8e-4,1e-3 --beta2s 0.98,0.99,0.995,0.999 DATA_BIN OUT \
        [--metric bleu|loss] [--seed 1] [--detok moses|none] [--eval-args "..."] \
        [-- train.sh flags, e.g. --small --cpu --max-update 300]

Runs examples/iwslt14/train.sh METHOD DATA_BIN OUT/<method>_lr<lr>_b2<beta2>_s<seed>
--lr LR --beta2 B2 for every cell, one after the other (a cell whose result already exists
is not run again), then with --metric bleu (default) evaluate.py on it. Writes
OUT/grid.md (markdown table: rows beta2, columns lr) and OUT/grid.png (heat map; a failed
or non-finite cell is grey, "x"). --metric loss uses the final validation loss from the
run's train.log instead and skips decoding. With --cpu among the train flags, decoding runs
on the CPU too. --eval-args passes flags to evaluate.py / fairseq-generate.
"""

import argparse
import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VENV_PY = REPO / ".venv" / "bin" / "python"
if __name__ == "__main__" and VENV_PY.exists() and Path(sys.prefix).resolve() != VENV_PY.parents[1].resolve():
    os.execv(str(VENV_PY), [str(VENV_PY), *sys.argv])


def _load(name):
    spec = importlib.util.spec_from_file_location("_iwslt14_" + name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def floats(text):
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return values


def run_cell(args, lr, beta2, train_extra, eval_extra):
    collect = _load("collect")
    name = f"{args.method}_lr{lr:g}_b2{beta2:g}_s{args.seed}"
    save = Path(args.out) / name
    result_file = save / "sweep_result.json"
    if result_file.is_file():
        print(f"[{name}] already done", flush=True)
        return json.loads(result_file.read_text())["value"]
    save.mkdir(parents=True, exist_ok=True)
    cmd = ["bash", str(HERE / "train.sh"), args.method, args.data_bin, str(save),
           "--lr", f"{lr:g}", "--beta2", f"{beta2:g}", "--seed", str(args.seed), *train_extra]
    print(f"[{name}] training: {shlex.join(cmd)}", flush=True)
    with open(save / "sweep.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    value = float("nan")
    loss = collect.final_valid_loss(save)
    if rc != 0:
        print(f"[{name}] training failed (exit {rc}); see {save}/train.log", flush=True)
    elif args.metric == "loss":
        value = loss if loss is not None else float("nan")
    else:
        ecmd = [sys.executable, str(HERE / "evaluate.py"), str(save), args.data_bin,
                "--detok", args.detok, *(["--cpu"] if "--cpu" in train_extra else []),
                *eval_extra]
        with open(save / "sweep.log", "a") as log:
            erc = subprocess.run(ecmd, stdout=log, stderr=subprocess.STDOUT).returncode
        if erc == 0:
            bleu = json.loads((save / "bleu.json").read_text())
            value = bleu.get("tokenized_bleu")
        else:
            print(f"[{name}] evaluation failed (exit {erc}); see {save}/sweep.log", flush=True)
    print(f"[{name}] {args.metric} = {value}  (final valid loss {loss})", flush=True)
    result_file.write_text(json.dumps({"value": value if math.isfinite(value) else None,
                                       "train_rc": rc, "valid_loss": loss}))
    return value


def write_grid(out: Path, method, metric, lrs, beta2s, grid):
    label = "tokenized BLEU" if metric == "bleu" else "final valid loss"
    lines = [f"{method}: {label} (rows beta2, columns lr)", "",
             "| beta2 \\ lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
             "|---" * (len(lrs) + 1) + "|"]
    for b2, row in zip(beta2s, grid):
        cells = ["x" if v is None or not math.isfinite(v) else f"{v:.2f}" for v in row]
        lines.append(f"| {b2:g} | " + " | ".join(cells) + " |")
    (out / "grid.md").write_text("\n".join(lines) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lrs), 1.0 + 0.7 * len(beta2s)))
    cmap = matplotlib.colormaps["viridis" if metric == "bleu" else "viridis_r"].copy()
    cmap.set_bad("lightgrey")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(beta2s)), [f"{b:g}" for b in beta2s])
    ax.set_xlabel("learning rate")
    ax.set_ylabel("Adam beta2")
    ax.set_title(f"{method}: {label}")
    for i in range(len(beta2s)):
        for j in range(len(lrs)):
            v = data[i, j]
            ax.text(j, i, "x" if not np.isfinite(v) else f"{v:.1f}", ha="center", va="center",
                    color="black" if not np.isfinite(v) else "white")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "grid.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description="lr x beta2 stability sweep (paper Fig. 4).",
                                epilog="Flags after '--' go to train.sh.")
    p.add_argument("data_bin")
    p.add_argument("out")
    p.add_argument("--method", required=True,
                   choices=("vanilla-warmup", "vanilla", "gradinit-adam", "gradinit-sgd",
                            "gradinit-wskip", "admin"))
    p.add_argument("--lrs", type=floats, required=True, help="comma-separated, e.g. 5e-4,1e-3")
    p.add_argument("--beta2s", type=floats, default=[0.98], help="comma-separated (default 0.98)")
    p.add_argument("--metric", choices=("bleu", "loss"), default="bleu")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--detok", choices=("moses", "none"), default="moses")
    p.add_argument("--eval-args", default="", help="more evaluate.py/fairseq-generate flags")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = [[run_cell(args, lr, b2, train_extra, shlex.split(args.eval_args))
             for lr in args.lrs] for b2 in args.beta2s]
    write_grid(out, args.method, args.metric, args.lrs, args.beta2s, grid)
    print((out / "grid.md").read_text(), end="")
    print(f"heat map: {out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
