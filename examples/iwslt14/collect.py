#!/usr/bin/env python3
"""Collect finished runs (seeds) into a markdown table.

    python examples/iwslt14/collect.py RUN_DIR [RUN_DIR ...] [--out table.md]
        [--metric tokenized_bleu|detok_bleu] [--max-loss 8] [--min-bleu 1]

A RUN_DIR is a SAVE_DIR of train.sh (run.json, train.log, and bleu.json from evaluate.py),
or a directory holding such SAVE_DIRs (searched recursively). Runs that differ only in
their seed form one row: same method, lr, beta2, --max-update, --small and further
fairseq-train flags (all from run.json). A row has mean +- std (sample std over seeds) of
the BLEU, the seeds, the mean final validation loss, and how many runs diverged: final
validation loss missing, not finite or above --max-loss (label-smoothed cross-entropy in
bits), or BLEU below --min-bleu. beta2 is "-" for SGD runs. Diverged runs are kept in the
mean (that is what the paper's mean +- std does). Under the table, in the output file as
on stdout: the diverged runs with the reason, and the runs without a BLEU (evaluate.py
not run yet).
"""

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

VALID = re.compile(r"valid on 'valid' subset \| loss (\S+)")


def final_valid_loss(save_dir: Path):
    log = save_dir / "train.log"
    if not log.is_file():
        return None
    loss = None
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        m = VALID.search(line)
        if m:
            try:
                loss = float(m.group(1))
            except ValueError:
                loss = float("nan")
    return loss


def find_runs(paths):
    runs = []
    for p in map(Path, paths):
        if (p / "run.json").is_file():
            runs.append(p)
        elif p.is_dir():
            runs.extend(sorted(r.parent for r in p.rglob("run.json")))
    return runs


def load_run(save_dir: Path, metric: str, max_loss: float, min_bleu: float) -> dict:
    info = json.loads((save_dir / "run.json").read_text())
    bleu_file = save_dir / "bleu.json"
    bleu = json.loads(bleu_file.read_text()).get(metric) if bleu_file.is_file() else None
    loss = final_valid_loss(save_dir)
    reasons = []
    if loss is None or not math.isfinite(loss):
        reasons.append(f"valid loss {loss}")
    elif loss > max_loss:
        reasons.append(f"valid loss {loss:.2f} > {max_loss:g}")
    if bleu is not None and bleu < min_bleu:
        reasons.append(f"BLEU {bleu:.2f} < {min_bleu:g}")
    return dict(info, dir=str(save_dir), bleu=bleu, loss=loss, diverged=bool(reasons),
                why=", ".join(reasons))


def fmt(x, digits=2):
    return "n/a" if x is None else f"{x:.{digits}f}"


def setting(run) -> tuple:
    """Everything in run.json that changes the result: all but the seed."""
    return (run["method"], run["lr"], run["beta2"], run.get("max_update"), run.get("small"),
            tuple(run.get("extra") or ()))


def table(runs) -> str:
    groups = {}
    for r in runs:
        groups.setdefault(setting(r), []).append(r)
    lines = ["| method | lr | beta2 | updates | size | other flags | BLEU (mean +- std) | seeds "
             "| final valid loss | diverged |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = lambda kv: tuple("" if v is None else str(v) for v in kv[0])  # noqa: E731
    for (method, lr, beta2, updates, small, extra), rs in sorted(groups.items(), key=order):
        bleus = [r["bleu"] for r in rs if r["bleu"] is not None]
        if bleus:
            std = statistics.stdev(bleus) if len(bleus) > 1 else 0.0
            bleu = f"{statistics.mean(bleus):.2f} +- {std:.2f}"
        else:
            bleu = "n/a"
        losses = [r["loss"] for r in rs if r["loss"] is not None]
        loss = fmt(statistics.mean(losses)) if losses else "n/a"
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        div = sum(r["diverged"] for r in rs)
        b2 = "-" if beta2 is None else f"{beta2:g}"
        size = "?" if small is None else ("small" if small else "full")
        flags = " ".join(extra).replace("|", "\\|") or "-"
        lines.append(f"| {method} | {lr:g} | {b2} | {'?' if updates is None else updates} | {size} "
                     f"| {flags} | {bleu} | {seeds} | {loss} | {div}/{len(rs)} |")
    return "\n".join(lines) + "\n"


def notes(runs, metric: str) -> str:
    """The diverged and the not yet evaluated runs, one line each, for under the table."""
    lines = [f"- diverged: {r['dir']} ({r['why']})" for r in runs if r["diverged"]]
    lines += [f"- not evaluated (no {metric} in bleu.json): {r['dir']}" for r in runs if r["bleu"] is None]
    return ("\n" + "\n".join(lines) + "\n") if lines else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Collect runs into a markdown table.")
    p.add_argument("runs", nargs="+", help="SAVE_DIRs of train.sh, or directories holding them")
    p.add_argument("--out", help="also write the table and the notes under it to this file")
    p.add_argument("--metric", default="tokenized_bleu",
                   choices=("tokenized_bleu", "detok_bleu", "fairseq_bleu"))
    p.add_argument("--max-loss", type=float, default=8.0,
                   help="final valid loss above this counts as diverged (default: 8)")
    p.add_argument("--min-bleu", type=float, default=1.0,
                   help="BLEU below this counts as diverged (default: 1)")
    a = p.parse_args(argv)
    dirs = find_runs(a.runs)
    if not dirs:
        print("error: no runs (directories with run.json) found", file=sys.stderr)
        return 2
    runs = [load_run(d, a.metric, a.max_loss, a.min_bleu) for d in dirs]
    text = table(runs) + notes(runs, a.metric)
    print(text, end="")
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
