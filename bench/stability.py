"""Does GradInit let a Post-LN Transformer train without warmup? Four runs, side by side.

    .venv/bin/python bench/stability.py                # Multi30k, 6+6x256, 200 updates, CPU (~1 h)
    .venv/bin/python bench/stability.py --seeds 3      # mean +- std over seeds 1..3
    .venv/bin/python bench/stability.py --scale iwslt --data DATA_BIN   # GPU-sized, see SCALES

Runs, all with Adam (0.9, 0.98) and the same linearly decaying lr, from the same seed:

    vanilla    Post-LN, no warmup (the failure case)
    warmup     Post-LN, linear warmup over --warmup updates, then the same decay
    gradinit   Post-LN + GradInit (Adam target), no warmup
    preln      Pre-LN, no warmup (reference)

Each run is stock fairseq-train with this plugin (its command is in RUN/command.txt);
training and validation loss are read from its json log every --interval updates and
BLEU (sacrebleu, signature printed) comes from beam search on the test set with the
last checkpoint (examples/iwslt14/evaluate.py). Writes OUT/results.md, OUT/results.json
and OUT/curves.png. A run whose RUN/result.json holds the same command is not run
again, so an interrupted bench resumes where it stopped (--fresh starts over).
"""
import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv" / "bin" / "python"
if __name__ == "__main__" and VENV_PY.exists() and Path(sys.prefix).resolve() != VENV_PY.parents[1].resolve():
    os.execv(str(VENV_PY), [str(VENV_PY), *sys.argv])
sys.path.insert(0, str(ROOT / "bench"))

from machine import machine_line  # noqa: E402
from multi30k import prepare_multi30k  # noqa: E402

METHODS = ("vanilla", "warmup", "gradinit", "preln")

#: Share of the initial l1 gradient norm below which a scale counts as "pinned at the
#: floor": within 1% of --gradinit-min-scale.
FLOOR_SLACK = 1.01

#: Model and schedule of each scale. "cpu" is issue 7's setting (6+6 layers, 256 wide, 4
#: heads, FFN 1024, dropout 0.1); "iwslt" is the paper's model and regularization.
#: GradInit: the plugin's defaults (eta = lr, gamma 1.25 x the first l1 norm), and for
#: the short CPU run 80 iterations at tau 1.5e-2 (docs/defaults.md, "Short GradInit runs").
SCALES = {
    "cpu": dict(
        model=["--arch", "transformer", "--encoder-layers", "6", "--decoder-layers", "6",
               "--encoder-embed-dim", "256", "--decoder-embed-dim", "256",
               "--encoder-ffn-embed-dim", "1024", "--decoder-ffn-embed-dim", "1024",
               "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
               "--dropout", "0.1"],
        lr=1e-3, updates=200, warmup=60, interval=25, gradinit_iters=80, gradinit_lr=1.5e-2,
    ),
    "iwslt": dict(
        model=["--arch", "transformer_iwslt_de_en", "--dropout", "0.3", "--weight-decay", "1e-4"],
        lr=5e-4, updates=8000, warmup=4000, interval=250, gradinit_iters=780, gradinit_lr=2.5e-3,
    ),
}  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="fairseq data-bin with a joined dictionary; default: Multi30k "
                   "from ../shared/data, prepared under bench/work/")
    p.add_argument("--out", default=str(ROOT / "bench" / "work" / "stability"))
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    p.add_argument("--seeds", type=int, default=1, help="run seeds 1..N")
    p.add_argument("--updates", type=int, help="updates per run (also the lr decay horizon)")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int, help="warmup updates of the 'warmup' run")
    p.add_argument("--interval", type=int, help="log and validate every N updates")
    p.add_argument("--gradinit-iters", type=int)
    p.add_argument("--gradinit-lr", type=float)
    p.add_argument("--gradinit-eta", type=float, help="virtual step of GradInit (default: the plugin's, = lr)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=FLAGS",
                   help="a further GradInit run 'gradinit-LABEL' with these extra fairseq flags "
                   "(e.g. ref=\"--gradinit-gamma 480\"); repeatable. Add it to --methods too, or it "
                   "is appended to them")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (a GPU machine takes several)")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--model-args", help="fairseq model flags replacing the scale's (a Post-LN arch; "
                   "preln adds --encoder/decoder-normalize-before)")
    p.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is there")
    p.add_argument("--no-bleu", action="store_true", help="skip beam search on the test set")
    p.add_argument("--fresh", action="store_true", help="run everything again")
    p.add_argument("--collect", action="store_true",
                   help="run nothing: write the tables from the runs under --out that finished")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoints")
    a = p.parse_args(argv)
    for key, value in SCALES[a.scale].items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    methods = a.methods.split(",")
    try:
        a.variants = dict(_parse_variant(v) for v in a.variant)
    except ValueError as e:
        p.error(f"--variant: {e}")
    methods += [m for m in a.variants if m not in methods]
    unknown = [m for m in methods if m not in METHODS and m not in a.variants]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    import torch

    a.cpu = a.cpu or not torch.cuda.is_available()
    data = Path(a.data) if a.data else prepare_multi30k()
    if not list(data.glob("dict.*.txt")):
        p.error(f"--data {data}: no fairseq dictionary there (run fairseq-preprocess first)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    jobs = [(method, seed) for seed in range(1, a.seeds + 1) for method in methods]
    if a.collect:
        results = [r for m, s in jobs if (r := finished(out / f"{m}-seed{s}"))]
    else:
        with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:  # each run is its own process
            results = list(pool.map(lambda job: run(job[0], job[1], data, out / f"{job[0]}-seed{job[1]}", a), jobs))
    summary = write_outputs(results, out, a)
    print(summary)


def fairseq_command(method, seed, data, save_dir, a):
    model = a.model_args.split() if a.model_args else list(SCALES[a.scale]["model"])
    if method == "preln":
        model += ["--encoder-normalize-before", "--decoder-normalize-before"]
    warmup = a.warmup if method == "warmup" else 0
    cmd = [sys.executable, "-m", "fairseq_cli.train", str(data),
           "--user-dir", str(ROOT / "fairseq_gradinit"), *model, "--share-all-embeddings",
           "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", str(a.lr), "--clip-norm", "0",
           "--lr-scheduler", "polynomial_decay", "--power", "1", "--warmup-updates", str(warmup),
           "--total-num-update", str(a.updates), "--max-update", str(a.updates),
           "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
           "--max-tokens", str(a.max_tokens), "--seed", str(seed),
           "--log-format", "json", "--log-interval", str(a.interval), "--no-progress-bar",
           "--validate-interval-updates", str(a.interval), "--validate-interval", "1000000",
           "--save-interval", "1000000", "--no-epoch-checkpoints", "--save-dir", str(save_dir)]  # fmt: skip
    if method == "gradinit" or method in getattr(a, "variants", {}):
        cmd += ["--gradinit", "--gradinit-iters", str(a.gradinit_iters), "--gradinit-lr", str(a.gradinit_lr)]
        if a.gradinit_eta is not None:
            cmd += ["--gradinit-eta", str(a.gradinit_eta)]
        cmd += getattr(a, "variants", {}).get(method, [])  # later flags win in argparse
    if a.cpu:
        cmd.append("--cpu")
    return cmd


def run(method, seed, data, save_dir, a) -> dict:
    cmd = fairseq_command(method, seed, data, save_dir, a)
    done = save_dir / "result.json"
    written = save_dir / "command.txt"
    if done.is_file() and written.is_file() and not a.fresh:
        before = json.loads(done.read_text())
        if written.read_text().strip() == " ".join(cmd) and ("bleu" in before or a.no_bleu):
            print(f"{save_dir.name}: done before with the same command, reading {done}", flush=True)
            return before
    if save_dir.exists():
        for old in save_dir.glob("checkpoint*.pt"):
            old.unlink()  # a stale checkpoint_last.pt would make fairseq resume
    save_dir.mkdir(parents=True, exist_ok=True)
    written.write_text(" ".join(cmd) + "\n")
    print(f"{save_dir.name}: training ({a.updates} updates) ...", flush=True)
    start = time.time()
    with open(save_dir / "train.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONWARNINGS="ignore"))
    seconds = time.time() - start
    curves = parse_log(save_dir / "train.log")
    result = {"method": method, "seed": seed, "exit_code": proc.returncode,
              "seconds": round(seconds, 1), **curves, **scales_summary(save_dir)}  # fmt: skip
    if proc.returncode != 0:
        print(f"{save_dir.name}: fairseq-train exited with {proc.returncode}; see {save_dir / 'train.log'}")
    elif not a.no_bleu:
        result["bleu"] = bleu(save_dir, data, a)
    if not a.keep_checkpoints:
        for checkpoint in save_dir.glob("checkpoint*.pt"):
            checkpoint.unlink()
    done.write_text(json.dumps(result, indent=1) + "\n")
    last = result["valid"][-1] if result["valid"] else None
    print(f"{save_dir.name}: {seconds:.0f}s, final valid loss {last and last[1]}, BLEU {result.get('bleu')}", flush=True)
    return result


def finished(save_dir: Path):
    """A run's result.json, if it finished; for --collect."""
    done = save_dir / "result.json"
    return json.loads(done.read_text()) if done.is_file() else None


def parse_log(path: Path) -> dict:
    """Training/validation loss per logged update and GradInit's summary line, from a json log."""
    train, valid, gradinit = [], [], None
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split(" | ", 3)
        if len(parts) < 4:
            continue
        name, text = parts[2], parts[3]
        if name == "fairseq_gradinit" and text.startswith("GradInit done"):
            gradinit = text
        if not text.startswith("{"):
            continue
        try:
            stats = json.loads(text)
        except json.JSONDecodeError:
            continue
        if name == "train_inner":
            train.append((int(stats["num_updates"]), _float(stats["loss"])))
        elif name == "valid":
            valid.append((int(stats["valid_num_updates"]), _float(stats["valid_loss"])))
    return {"train": train, "valid": sorted(set(valid)), "gradinit": gradinit}


def scales_summary(save_dir: Path) -> dict:
    """What GradInit did, from the run's gradinit_scales.json: branch counts and the
    tensors it scaled down most or pinned at the lower bound (empty without GradInit)."""
    path = save_dir / "gradinit_scales.json"
    if not path.is_file():
        return {}
    payload = json.loads(path.read_text())
    scales, settings = payload["scales"], payload.get("settings", {})
    floor = settings.get("min_scale", 0.01) * FLOOR_SLACK
    weights = {n: v for n, v in scales.items() if not n.endswith(".bias")}
    return {
        "constraint_iterations": payload.get("constraint_iterations"),
        "gradinit_iterations": payload.get("iterations"),
        "gamma": payload.get("gamma"),
        "gradinit_seconds": payload.get("seconds"),
        "floor": sorted(n for n, v in weights.items() if v <= floor),
        "lowest": sorted(weights.items(), key=lambda kv: kv[1])[:8],
        "highest": sorted(weights.items(), key=lambda kv: -kv[1])[:4],
    }


def bleu(save_dir: Path, data: Path, a):
    spec = importlib.util.spec_from_file_location("evaluate", ROOT / "examples" / "iwslt14" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    # Multi30k is raw text under sentencepiece: the decoded output is detokenized already.
    # Early checkpoints babble, so the output length is bounded.
    result = evaluate.evaluate(save_dir, data, "checkpoint_last.pt", "test", cpu=a.cpu, detok="none",
                               extra=["--max-len-a", "1.2", "--max-len-b", "10"])  # fmt: skip
    return {"bleu": result["detok_bleu"], "signature": result["detok_signature"]}


def write_outputs(results, out: Path, a) -> str:
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    methods = list(dict.fromkeys(r["method"] for r in results))
    steps = sorted({u for r in results for u, _ in r["valid"]})
    lines = [f"Post-LN without warmup on `{a.data or 'Multi30k'}`, scale `{a.scale}`: lr {a.lr} decayed "
             f"linearly to 0 over {a.updates} updates, max-tokens {a.max_tokens}, "
             f"seeds 1..{a.seeds}; 'warmup' warms up over {a.warmup} updates; GradInit "
             f"{a.gradinit_iters} iterations, tau {a.gradinit_lr}, eta {a.gradinit_eta or a.lr}.", "",
             "Validation loss (label-smoothed cross-entropy, base 2; mean +- std over seeds)", "",
             "| method | " + " | ".join(f"@{u}" for u in steps) + " | BLEU | minutes |",
             "|---|" + "---|" * (len(steps) + 2)]  # fmt: skip
    for m in methods:
        runs = [r for r in results if r["method"] == m]
        cells = [_mean_std([dict(r["valid"]).get(u) for r in runs]) for u in steps]
        scores = [r["bleu"]["bleu"] if r.get("bleu") else None for r in runs]
        minutes = _mean_std([r["seconds"] / 60 for r in runs], 0)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_mean_std(scores, 1)} | {minutes} |")
    sigs = {r["bleu"]["signature"] for r in results if r.get("bleu")}
    lines += ["", *(f"BLEU: sacrebleu, {s}" for s in sigs)]
    lines += [f"{r['method']}-seed{r['seed']}: {r['gradinit']}" for r in results if r.get("gradinit")]
    gi = [m for m in methods if any(r.get("constraint_iterations") is not None for r in results if r["method"] == m)]
    if gi:
        lines += ["", "| GradInit run | constraint steps (per seed) | weight tensors at the floor (per seed) | GradInit seconds |",
                  "|---|---|---|---|"]
        for m in gi:
            runs = [r for r in results if r["method"] == m and r.get("gradinit_iterations")]
            steps = ", ".join(f"{r['constraint_iterations']}/{r['gradinit_iterations']}" for r in runs)
            floors = ", ".join(str(len(r["floor"])) for r in runs)
            lines.append(f"| {m} | {steps} | {floors} | {_mean_std([r['gradinit_seconds'] for r in runs], 0)} |")
    pinned = [f"{r['method']}-seed{r['seed']}: {len(r['floor'])} at the floor: {', '.join(r['floor'])}"
              for r in results if r.get("floor")]
    lines += ["", "Weight tensors GradInit pinned at --gradinit-min-scale:", "", *pinned] if pinned else []
    lines += ["", verdict(results, steps), "", "command: " + " ".join(["bench/stability.py", *sys.argv[1:]]),
              machine_line("cpu" if a.cpu else "cuda")]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    plot(results, methods, out / "curves.png")
    return text + f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'curves.png'}"


def verdict(results, steps) -> str:
    """Whether GradInit without warmup is at least as good as warmup at every validation point."""
    def mean_at(method, u):
        values = [dict(r["valid"]).get(u) for r in results if r["method"] == method]
        values = [v for v in values if v is not None and math.isfinite(v)]
        return statistics.mean(values) if values else math.inf

    methods = {r["method"] for r in results}
    if not {"gradinit", "warmup"} <= methods or not steps:
        return "verdict: needs the gradinit and warmup runs"
    behind = [u for u in steps if mean_at("gradinit", u) > mean_at("warmup", u)]
    if not behind:
        return "verdict: GradInit without warmup learns at least as fast as the warmup baseline (validation loss <= at every point)"
    return f"verdict: GradInit without warmup is BEHIND the warmup baseline at updates {behind}"


def plot(results, methods, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key in zip(axes, ("train", "valid")):
        for i, m in enumerate(methods):
            for r in (r for r in results if r["method"] == m):
                if r[key]:
                    xs, ys = zip(*r[key])
                    ax.plot(xs, ys, color=f"C{i}", marker="o", ms=3,
                            label=m if r["seed"] == 1 else None, alpha=0.9)
        ax.set_title(f"{key} loss")
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("label-smoothed cross-entropy (bits)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_variant(text):
    label, sep, flags = text.partition("=")
    if not sep or not label.strip():
        raise ValueError(f"{text!r} is not LABEL=FLAGS")
    return "gradinit-" + label.strip(), flags.split()


def _float(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _mean_std(values, digits=3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


if __name__ == "__main__":
    main()
