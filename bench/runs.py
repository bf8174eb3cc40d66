"""Shared machinery of bench/depth.py and bench/gpu.py: run many stock fairseq-train
runs (in parallel, under a time budget), score them and write one table per group.

Each run is ``python -m fairseq_cli.train`` (so that it works where fairseq is installed
with ``pip --target`` and has no console scripts), followed by BLEU on the test set
with examples/iwslt14/evaluate.py. A run lives in its own directory: command.txt,
train.log, gradinit_scales.json (GradInit runs), bleu.log and result.json. A run that
fails, diverges or runs out of time is recorded as such; the others go on.

The loss-curve parser and the table helpers come from bench/stability.py.
"""
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from stability import _mean_std, parse_log  # noqa: E402

#: Every run's fixed part: Adam (0.9, 0.98) without clipping, linear decay to 0 over the
#: run, label smoothing 0.1, shared embeddings (the data has a joined dictionary).
COMMON = ["--share-all-embeddings", "--optimizer", "adam", "--adam-betas", "(0.9,0.98)",
          "--clip-norm", "0", "--lr-scheduler", "polynomial_decay", "--power", "1",
          "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
          "--log-format", "json", "--no-progress-bar", "--validate-interval", "1000000",
          "--save-interval", "1000000", "--no-epoch-checkpoints"]  # fmt: skip


#: what fairseq logs when it stops on a non-finite loss or gradient (fp32, fp16)
NONFINITE_MARKERS = ("FloatingPointError", "Minimum loss scale reached", "gradients are Nan/Inf")


@dataclass
class Run:
    """One fairseq-train run: its method, seed and the flags that differ between runs."""

    method: str
    seed: int
    save_dir: Path
    args: List[str]  # model and method flags
    updates: int
    lr: float
    interval: int
    max_tokens: int
    device: str = "cpu"
    fp16: bool = False
    warmup: int = 0
    extra: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.method}-seed{self.seed}"

    def command(self, data: Path) -> List[str]:
        cmd = [sys.executable, "-m", "fairseq_cli.train", str(data), "--user-dir", str(ROOT / "fairseq_gradinit"),
               *self.args, *COMMON, "--lr", str(self.lr), "--warmup-updates", str(self.warmup),
               "--total-num-update", str(self.updates), "--max-update", str(self.updates),
               "--max-tokens", str(self.max_tokens), "--seed", str(self.seed),
               "--log-interval", str(self.interval), "--validate-interval-updates", str(self.interval),
               "--save-dir", str(self.save_dir), *self.extra]  # fmt: skip
        if self.device == "cpu":
            cmd.append("--cpu")
        if self.fp16:
            cmd.append("--fp16")
        return cmd


class Budget:
    """Wall-clock budget shared by all runs: no run starts, and none trains, past it.

    ``reserve`` seconds at the end are kept for BLEU; a run started with less than
    ``min_start`` seconds of training time left is skipped.
    """

    def __init__(self, seconds: Optional[float], reserve: float = 0.0, min_start: float = 0.0):
        self.deadline = None if seconds is None else time.time() + seconds
        self.reserve, self.min_start = reserve, min_start

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.time()

    def train_seconds(self) -> float:
        return self.left() - self.reserve


#: set by stop(): no run or BLEU starts any more
STOPPED = threading.Event()
_live: Dict[int, subprocess.Popen] = {}  # process groups of the running children, by pid


def stop(signum=None, frame=None):
    """Kill every running child (its whole process group) and start nothing new.

    Installed as the SIGTERM/SIGINT handler by the benches' main(), so that a bench
    killed from outside (``timeout``) still writes its tables with what finished.
    """
    STOPPED.set()
    for pid in list(_live):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def install_stop_handler():
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)


def call(cmd, log_path: Path, timeout: Optional[float], env=None) -> Optional[int]:
    """Run cmd with its output in log_path; kill its whole process group at the timeout.

    Returns the exit code, or None when it was killed for time (or by stop()).
    """
    if STOPPED.is_set():
        return None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONWARNINGS="ignore", **(env or {})))  # fmt: skip
        _live[proc.pid] = proc
        try:
            code = proc.wait(timeout=None if timeout is None or math.isinf(timeout) else max(timeout, 1))
            return None if STOPPED.is_set() and code < 0 else code
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.write(f"\n[bench] killed after {timeout:.0f}s: out of the time budget\n")
            return None
        finally:
            _live.pop(proc.pid, None)


def execute(run: Run, data: Path, budget: Budget, bleu=True, fresh=False, env=None) -> Dict:
    """Train, then score, one run; returns (and writes to SAVE_DIR/result.json) what it measured."""
    cmd = run.command(data)
    save_dir = run.save_dir
    done, written = save_dir / "result.json", save_dir / "command.txt"
    if done.is_file() and written.is_file() and not fresh:
        before = json.loads(done.read_text())
        if written.read_text().strip() == " ".join(cmd) and before.get("status") == "done" and (before.get("bleu") or not bleu):
            print(f"{run.name}: done before with the same command, reading {done}", flush=True)
            return before
    base = {"method": run.method, "seed": run.seed, "updates_planned": run.updates, "save_dir": str(save_dir)}
    seconds_left = budget.train_seconds()
    if seconds_left < budget.min_start or STOPPED.is_set():
        print(f"{run.name}: skipped, {seconds_left:.0f}s of the time budget left", flush=True)
        return {**base, "status": "skipped", "exit_code": None, "seconds": 0, "train": [], "valid": [],
                "valid_nll": [], "gradinit": None}  # fmt: skip
    save_dir.mkdir(parents=True, exist_ok=True)
    for old in save_dir.glob("checkpoint*.pt"):
        old.unlink()  # a stale checkpoint_last.pt would make fairseq resume
    for old in ("gradinit_scales.json", "bleu.json"):
        (save_dir / old).unlink(missing_ok=True)
    if not math.isinf(seconds_left):
        # fairseq stops by itself, validating and saving a checkpoint, past this time
        # (its clock starts after start-up: 40s are left for that and the final save)
        cmd += ["--stop-time-hours", f"{max(seconds_left - 40, 10) / 3600:.5f}"]
    written.write_text(" ".join(run.command(data)) + "\n")
    print(f"{run.name}: training ({run.updates} updates) ...", flush=True)
    start = time.time()
    code = call(cmd, save_dir / "train.log", seconds_left, env)
    seconds = time.time() - start
    result = {**base, "exit_code": code, "seconds": round(seconds, 1), **parse_log(save_dir / "train.log"),
              "valid_nll": parse_valid_nll(save_dir / "train.log")}  # fmt: skip
    log_text = (save_dir / "train.log").read_text(errors="replace")
    result["nonfinite"] = any(marker in log_text for marker in NONFINITE_MARKERS)
    result["updates_done"] = max([u for u, _ in result["train"] + result["valid"]], default=0)
    result["status"] = "done" if code == 0 else ("failed" if code is not None else
                                                 "stopped (signal)" if STOPPED.is_set() else "out of time")
    if code != 0:
        print(f"{run.name}: fairseq-train {'ran out of time' if code is None else f'exited with {code}'}; "
              f"see {save_dir / 'train.log'}", flush=True)  # fmt: skip
    scales = save_dir / "gradinit_scales.json"
    if scales.is_file():
        result["scales"] = json.loads(scales.read_text())
    if bleu and (save_dir / "checkpoint_last.pt").is_file() and budget.left() > 5 and not STOPPED.is_set():
        result["bleu"] = score(save_dir, data, run.device, budget.left() - 5, env)
    for checkpoint in save_dir.glob("checkpoint*.pt"):
        checkpoint.unlink()
    done.write_text(json.dumps(result, indent=1) + "\n")
    last = result["valid"][-1][1] if result["valid"] else None
    print(f"{run.name}: {seconds:.0f}s, {result['updates_done']} updates, final valid loss {last}, "
          f"BLEU {(result.get('bleu') or {}).get('bleu')}", flush=True)  # fmt: skip
    return result


def score(save_dir: Path, data: Path, device: str, timeout: float, env=None) -> Optional[Dict]:
    """Detokenized BLEU of the last checkpoint on the test set (examples/iwslt14/evaluate.py).

    Multi30k is raw text under sentencepiece, so the decoded output needs no
    detokenizer; early checkpoints babble, so the output length is bounded.
    """
    cmd = [sys.executable, str(ROOT / "examples" / "iwslt14" / "evaluate.py"), str(save_dir), str(data),
           "--checkpoint", "checkpoint_last.pt", "--detok", "none", *(["--cpu"] if device == "cpu" else []),
           "--max-len-a", "1.2", "--max-len-b", "10"]  # fmt: skip
    code = call(cmd, save_dir / "bleu.log", timeout, env)
    path = save_dir / "bleu.json"
    if code != 0 or not path.is_file():
        print(f"{save_dir.name}: no BLEU ({'out of time' if code is None else f'exit {code}'}); "
              f"see {save_dir / 'bleu.log'}", flush=True)  # fmt: skip
        return None
    result = json.loads(path.read_text())
    return {"bleu": result["detok_bleu"], "signature": result["detok_signature"]}


def run_all(runs: List[Run], data: Path, budget: Budget, jobs=1, bleu=True, fresh=False,
            on_result=None) -> List[Dict]:
    """execute() every run, ``jobs`` at a time; results in the order of ``runs``.

    Each child gets cores / jobs threads (torch would otherwise start one per core in
    every process). ``on_result(results so far)`` is called after every run, so partial
    tables exist even if the bench is killed.
    """
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
           "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", str(threads))}  # fmt: skip
    results: List[Optional[Dict]] = [None] * len(runs)
    lock = threading.Lock()

    def one(i):
        try:
            r = execute(runs[i], data, budget, bleu=bleu, fresh=fresh, env=env)
        except Exception as e:  # one broken run must not lose the others' results
            print(f"{runs[i].name}: bench error {type(e).__name__}: {e}", flush=True)
            r = {"method": runs[i].method, "seed": runs[i].seed, "save_dir": str(runs[i].save_dir),
                 "status": f"bench error: {e}", "exit_code": None,
                 "seconds": 0, "train": [], "valid": [], "valid_nll": [], "gradinit": None}  # fmt: skip
        with lock:
            results[i] = r
            if on_result:
                on_result([x for x in results if x is not None])

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, range(len(runs))))
    return results


def parse_valid_nll(path: Path):
    """(update, validation nll in bits) pairs from a fairseq json log."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if " | valid | {" not in line:
            continue
        try:
            stats = json.loads(line.split(" | valid | ", 1)[1])
            out.append((int(stats["valid_num_updates"]), float(stats["valid_nll_loss"])))
        except (ValueError, KeyError):
            continue
    return sorted(set(out))


def unigram_bits(data: Path) -> float:
    """Entropy (bits per token, end of sentence included) of the training targets' unigram
    distribution: the validation nll of a model that learned token frequencies only."""
    import numpy as np
    from fairseq.data import Dictionary, data_utils

    found = sorted(data.glob("train.*-*.*.bin"))
    if not found:
        raise SystemExit(f"--data {data}: no binarized train split (train.SRC-TGT.TGT.bin)")
    src, tgt = found[0].name.split(".")[1].split("-")
    dictionary = Dictionary.load(str(data / f"dict.{tgt}.txt"))
    dataset = data_utils.load_indexed_dataset(str(data / f"train.{src}-{tgt}.{tgt}"), dictionary)
    counts = np.bincount(np.concatenate([dataset[i].numpy() for i in range(len(dataset))]))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def verdict_of(result: Dict, unigram: float) -> str:
    """'ok'; 'diverged': a non-finite loss, or fairseq stopped on one; 'stuck': final validation
    nll at or above the unigram entropy (learned nothing beyond token frequencies); 'error':
    fairseq failed for another reason; 'not run': skipped or never validated."""
    if result.get("status") == "skipped" or result.get("status", "").startswith("bench error"):
        return "not run"
    losses = [v for _, v in result["train"] + result["valid"] + result.get("valid_nll", [])]
    if result.get("nonfinite") or any(not math.isfinite(v) for v in losses):
        return "diverged"
    if result.get("exit_code") not in (0, None):
        return "error"
    if not result["valid_nll"]:
        return "not run"
    final = result["valid_nll"][-1][1]
    if not math.isfinite(final):
        return "diverged"
    return "stuck" if final >= unigram else "ok"


def scales_pattern(results: List[Dict]) -> List[str]:
    """Markdown: GradInit's scales per tensor kind (layers pooled), mean over seeds, and the
    layers whose scale sits at the floor (--gradinit-min-scale)."""
    runs = [r for r in results if r.get("scales")]
    if not runs:
        return []
    methods = list(dict.fromkeys(r["method"] for r in runs))
    kinds: Dict[str, Dict[str, List]] = {}
    for r in runs:
        settings = r["scales"].get("settings", {})
        for name, value in r["scales"]["scales"].items():
            # biases have their own floor (--gradinit-min-bias-scale semantics in core: 0 by default)
            key, default = ("min_bias_scale", 0.0) if name.endswith(".bias") else ("min_scale", 0.01)
            floor = float(settings.get(key, default))
            m = re.search(r"layers\.(\d+)\.", name)
            kind = re.sub(r"layers\.\d+\.", "layers.*.", name)
            entry = kinds.setdefault(kind, {}).setdefault(r["method"], [])
            entry.append((value, m.group(1) if m else "", value <= floor * 1.001 + 1e-6, r["seed"]))
    lines = ["GradInit scales per tensor kind (mean over layers and seeds, min; the layers whose scale "
             "is at its lower bound, with the seed: --gradinit-min-scale for weights, 0 for biases):", "",
             "| tensor | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]  # fmt: skip
    down = {}
    for kind, per_method in kinds.items():
        cells = []
        for m in methods:
            values = per_method.get(m)
            if not values:
                cells.append("-")
                continue
            mean = statistics.mean(v for v, *_ in values)
            at_floor = [f"L{layer}/s{seed}" if layer else f"s{seed}" for _, layer, floored, seed in values if floored]
            cell = f"{mean:.2f} (min {min(v for v, *_ in values):.2f})"
            if at_floor:
                cell += " floor: " + ",".join(at_floor[:8]) + (" ..." if len(at_floor) > 8 else "")
            cells.append(cell)
            if mean < 0.5:
                down.setdefault(m, []).append(kind)
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    for m, names in down.items():
        lines += ["", f"{m}: scaled down (mean < 0.5): " + ", ".join(names)]
    return lines


def table(results: List[Dict], unigram: float, title: str) -> List[str]:
    """Markdown: validation loss at fixed updates, failures, final nll, BLEU, minutes."""
    methods = list(dict.fromkeys(r["method"] for r in results))
    steps = sorted({u for r in results for u, _ in r["valid"]})
    lines = [title, "",
             "| method | " + " | ".join(f"@{u}" for u in steps) + " | final valid nll | failed | BLEU | updates | minutes |",
             "|---|" + "---|" * (len(steps) + 5)]  # fmt: skip
    for m in methods:
        runs = [r for r in results if r["method"] == m]
        cells = [_mean_std([dict(r["valid"]).get(u) for r in runs]) for u in steps]
        finals = [r["valid_nll"][-1][1] if r.get("valid_nll") else None for r in runs]
        verdicts = [verdict_of(r, unigram) for r in runs]
        bad = [v for v in verdicts if v in ("diverged", "stuck")]
        ran = [v for v in verdicts if v not in ("not run", "error")]
        failed = f"{len(bad)}/{len(ran)}" + (f" ({', '.join(sorted(set(bad)))})" if bad else "")
        for other in ("error", "not run"):
            if other in verdicts:
                failed += f"; {verdicts.count(other)} {other}"
        scores = [r["bleu"]["bleu"] if r.get("bleu") else None for r in runs]
        updates = _mean_std([r.get("updates_done") for r in runs], 0)
        minutes = _mean_std([r["seconds"] / 60 for r in runs if r.get("seconds")], 1)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_mean_std([f for f in finals if f is not None])} "
                     f"| {failed} | {_mean_std(scores, 1)} | {updates} | {minutes} |")  # fmt: skip
    sigs = sorted({r["bleu"]["signature"] for r in results if r.get("bleu")})
    lines += ["", f"Cells: validation loss (label-smoothed cross-entropy, bits), mean +- std over seeds. "
              f"failed = diverged (a non-finite loss, or fairseq stopped on one) or stuck (final "
              f"validation nll >= {unigram:.3f} bits, the entropy of the training targets' unigram "
              f"distribution: nothing learned beyond token frequencies).",
              *(f"BLEU: sacrebleu (test set, beam 5, last checkpoint), {s}" for s in sigs)]  # fmt: skip
    for r in results:
        if r.get("status") not in ("done", None):
            lines.append(f"{r['method']}-seed{r['seed']}: {r['status']}")
    return lines


def plot(results: List[Dict], unigram: float, path: Path, title: str):
    """Training loss and validation nll per run, one colour per method, with the unigram level."""
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq leaves the root logger at DEBUG
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (("train", "training loss (label-smoothed, bits)"), ("valid_nll", "validation nll (bits)"))
    for ax, (key, label) in zip(axes, panels):
        values = []
        for i, m in enumerate(methods):
            first = True
            for r in (r for r in results if r["method"] == m and r.get(key)):
                xs, ys = zip(*r[key])
                values += [y for y in ys if math.isfinite(y)]
                ax.plot(xs, ys, color=f"C{i % 10}", ls="-" if i < 10 else "--", marker="o", ms=2,
                        label=m if first else None, alpha=0.85)  # fmt: skip
                first = False
        if key == "valid_nll":
            ax.axhline(unigram, color="k", ls=":", lw=1, label="unigram entropy")
        if values:
            ax.set_ylim(min(values) - 0.3, min(max(values), unigram + 5) + 0.3)
        ax.set_title(f"{label}, {title}", fontsize=9)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
