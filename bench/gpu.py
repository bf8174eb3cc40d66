"""One GPU, nine minutes: the no-warmup comparison at the paper's model size, deep Post-LN
with every initialization, and GradInit's cost, in one command.

The command (GPU machine, repository root; fairseq installed with pip --target):

    export PYTHONPATH=/tmp/site:$PWD
    PYTHON=python3 bash bench/gpu.sh /tmp/gpu-bench --results "$OUT/results" --archive "$OUT/gpu-runs.tar.gz"
    # = python3 bench/gpu.py --out /tmp/gpu-bench --results "$OUT/results" --archive ...

then copy the returned results/gpu* into bench/results/ (only tables and one archive go
to $OUT: the device returns few, shallow files). What it runs, all on the one GPU:

1. bench/cost.py --device cuda --models iwslt (alone, so that its timings are clean);
2. then, all at once in separate processes (fp16, Multi30k at bench/work/multi30k/data-bin):
   - iwslt: transformer_iwslt_de_en (dropout 0.3, weight decay 1e-4, lr 5e-4, 1200
     updates): vanilla (no warmup), warmup (300 updates, see WARMUP below), gradinit
     (Adam target, 100 iterations at tau 1.5e-2), admin (transformer_wskip_iwslt_de_en,
     profiling Admin);
   - depth: bench/depth.py's gpu scale (18+18 layers x 128, FFN 512, lr 2e-3) with all
     nine methods for 1200 updates ('warmup': 300);
   each followed by BLEU on the test set (beam 5).

Robustness: every run is its own process; one that fails is recorded and the others go
on. A global budget (--budget-minutes, default 8.5) stops starting runs, makes fairseq
stop training (--stop-time-hours, with a final validation and checkpoint) early enough to
leave --bleu-reserve seconds for BLEU, and kills whatever is still running at the end.
Tables are rewritten after every finished run, so a killed bench leaves partial results:
RESULTS/gpu-iwslt.md|.png|.json, gpu-depth.md|.png|.json, gpu-cost.md, gpu.md (index),
in --results (default bench/results) and in OUT/results.

WARMUP: the paper's baseline warms up over 4000 updates, but these runs are 1200 updates
long, so a 4000-update warmup would never reach the peak lr. 300 updates (25% of the
run) is 3x the 2/(1 - beta2) = 100 updates that untuned linear warmup needs for Adam
with beta2 = 0.98 (Ma & Yarats 2021), so the baseline is not starved of warmup.

RUN LENGTH: 13 training processes share the GPU and 16 cores (one thread each). If they
are slower than planned, fairseq's --stop-time-hours ends them early with a final
validation and checkpoint; the tables give the updates each run reached, and compare
losses at the same updates.

``--preset tiny`` (the test suite's) runs the same pipeline on CPU with tiny models,
a few updates and a subset of the methods, in well under a minute.
"""
import argparse
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import depth  # noqa: E402
import runs as R  # noqa: E402

IWSLT = dict(arch="transformer_iwslt_de_en", lr=5e-4, updates=1200, warmup=300, interval=100, max_tokens=4096,
             gradinit_iters=100, gradinit_lr=1.5e-2, fp16=True)  # fmt: skip
IWSLT_MODEL = ["--dropout", "0.3", "--weight-decay", "1e-4"]

PRESETS = {
    "gpu": dict(device="cuda", iwslt=IWSLT, iwslt_model=IWSLT_MODEL,
                iwslt_methods=("vanilla", "warmup", "gradinit", "admin"),
                depth=dict(depth.SCALES["gpu"], updates=1200, warmup=300), depth_methods=depth.METHODS,
                cost=["--device", "cuda", "--models", "iwslt"], cost_timeout=150, cost_alone=True,
                budget_minutes=8.5, bleu_reserve=75, min_start=60),
    "tiny": dict(device="cpu", iwslt=dict(IWSLT, arch="transformer", updates=4, warmup=2, interval=2,
                                          max_tokens=1024, gradinit_iters=3, fp16=False),
                 iwslt_model=depth.model_flags(depth.SCALES["tiny"]), iwslt_methods=("vanilla", "gradinit"),
                 depth=depth.SCALES["tiny"], depth_methods=("admin", "tfixup"),
                 cost=["--device", "cpu", "--models", "tiny", "--max-tokens", "256", "--repeats", "1",
                       "--warmup", "0"], cost_timeout=300, cost_alone=False,
                 budget_minutes=10, bleu_reserve=10, min_start=0),
}  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    p.add_argument("--data", default=str(ROOT / "bench" / "work" / "multi30k" / "data-bin"))
    p.add_argument("--out", default=os.environ.get("BENCH_OUT", str(ROOT / "bench" / "work" / "gpu")),
                   help="runs go to OUT/runs, tables also to OUT/results (default $BENCH_OUT or bench/work/gpu)")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where the tables go")
    p.add_argument("--budget-minutes", type=float, help="wall-clock budget of the whole bench")
    p.add_argument("--bleu-reserve", type=float, help="seconds kept at the end for BLEU")
    p.add_argument("--skip-cost", action="store_true", help="leave out bench/cost.py")
    p.add_argument("--archive", help="write the runs' logs and JSON (no checkpoints) to this .tar.gz at the end")
    a = p.parse_args(argv)
    start = time.time()
    cfg = PRESETS[a.preset]
    budget_s = 60 * (a.budget_minutes or cfg["budget_minutes"])
    deadline = start + budget_s
    data = Path(a.data)
    if not list(data.glob("dict.*.txt")):
        p.error(f"--data {data}: no fairseq dictionary there (binarized Multi30k expected)")
    out = Path(a.out)
    tables = [Path(a.results), out / "results"]
    for t in tables:
        t.mkdir(parents=True, exist_ok=True)
    prefix = "gpu" if a.preset == "gpu" else f"gpu-{a.preset}"
    device = cfg["device"]
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--preset gpu: torch sees no GPU (use --preset tiny on CPU)")
        device_name = torch.cuda.get_device_name(0)
    else:
        device_name = "cpu"
    command = " ".join(["bench/gpu.py", *(argv if argv is not None else sys.argv[1:])])
    unigram = R.unigram_bits(data)
    label = depth.data_label(data)
    index = [f"# GPU bench ({a.preset}) on {device_name}", "", f"command: {command}", ""]

    cost_lines = []
    cost = lambda: cost_lines.append(run_cost(cfg, data, tables, prefix, deadline, device_name, out))  # noqa: E731
    # on the GPU alone first, for clean timings; in the tiny preset beside the runs (time)
    cost_thread = threading.Thread(target=cost) if not a.skip_cost and not cfg["cost_alone"] else None
    if not a.skip_cost and cfg["cost_alone"]:
        cost()

    iwslt_s, depth_s = cfg["iwslt"], cfg["depth"]
    iwslt_runs = iwslt_runs_of(cfg, out / "runs" / "iwslt", device)
    depth_runs = depth.build_runs(depth_s, cfg["depth_methods"], [1], out / "runs" / "depth", device)
    groups = {
        "iwslt": (iwslt_runs, f"{label}, {iwslt_s['arch']} ({' '.join(cfg['iwslt_model'])}), "
                  f"Adam (0.9, 0.98), lr {iwslt_s['lr']} decayed linearly to 0 over {iwslt_s['updates']} "
                  f"updates, no clipping, max-tokens {iwslt_s['max_tokens']}, "
                  f"{'fp16' if iwslt_s['fp16'] and device == 'cuda' else 'fp32'} on {device_name}, seed 1; "
                  f"'warmup' warms up over {iwslt_s['warmup']} updates; GradInit {iwslt_s['gradinit_iters']} "
                  f"iterations, tau {iwslt_s['gradinit_lr']}, eta = lr; all runs at once on one device."),
        "depth": (depth_runs, depth.describe(depth_s, device, 1, label).replace(
            f"on {device}", f"on {device_name}") + " All runs at once on one device."),
    }  # fmt: skip
    everything = iwslt_runs + depth_runs
    budget = R.Budget(deadline - time.time(), reserve=a.bleu_reserve or cfg["bleu_reserve"],
                      min_start=cfg["min_start"])  # fmt: skip

    def write(results):
        for name, (group_runs, header) in groups.items():
            dirs = {str(r.save_dir) for r in group_runs}
            mine = [res for res in results if res.get("save_dir") in dirs]
            if mine:
                for t in tables:
                    depth.write_outputs(mine, unigram, t, f"{prefix}-{name}", header, command)

    if cost_thread:
        cost_thread.start()
    results = R.run_all(everything, data, budget, jobs=len(everything), on_result=write)
    write(results)
    if cost_thread:
        cost_thread.join()
    index += cost_lines
    index += [f"- {prefix}-{name}.md / .png / .json: {len(g[0])} runs" for name, g in groups.items()]
    index.append(f"\ntotal {(time.time() - start) / 60:.1f} min of a {budget_s / 60:.1f} min budget")
    for t in tables:
        (t / f"{prefix}.md").write_text("\n".join(index) + "\n")
    if a.archive:
        import tarfile

        with tarfile.open(a.archive, "w:gz") as tar:
            tar.add(out / "runs", arcname="runs", filter=lambda info: None if info.name.endswith(".pt") else info)
    print("\n".join(index))
    for t in tables[:1]:
        for name in groups:
            md = t / f"{prefix}-{name}.md"
            if md.is_file():
                print(f"\n{md}:\n{md.read_text()}")
    return results


def iwslt_runs_of(cfg, out: Path, device: str):
    """The iwslt group: depth's methods on transformer_iwslt_de_en (or the tiny preset's model)."""
    s = cfg["iwslt"]
    runs = []
    for m in cfg["iwslt_methods"]:
        args = depth.method_args(m, s["arch"], list(cfg["iwslt_model"]), s["gradinit_iters"], s["gradinit_lr"])
        runs.append(R.Run(method=m, seed=1, save_dir=out / f"{m}-seed1", args=args, updates=s["updates"],
                          lr=s["lr"], interval=s["interval"], max_tokens=s["max_tokens"], device=device,
                          fp16=s["fp16"] and device == "cuda", warmup=s["warmup"] if m == "warmup" else 0))  # fmt: skip
    return runs


def run_cost(cfg, data, tables, prefix, deadline, device_name, out: Path) -> str:
    """bench/cost.py with the preset's flags; its table (or its failure) into PREFIX-cost.md."""
    timeout = min(cfg["cost_timeout"], deadline - time.time() - 60)
    out.mkdir(parents=True, exist_ok=True)
    # --out: cost.py's own table stays with this bench's runs, not in bench/results/cost-*.md
    cmd = [sys.executable, str(ROOT / "bench" / "cost.py"), "--data", str(data), *cfg["cost"],
           "--out", str(out / "cost.md")]  # fmt: skip
    start = time.time()
    code = R.call(cmd, out / "cost.log", timeout)
    text = (out / "cost.log").read_text(errors="replace")
    if code == 0:  # the table and its command, without the children's log lines
        text = text[text.index("GradInit cost,"):] if "GradInit cost," in text else text
    else:
        text = text[-3000:]
    status = "" if code == 0 else (" FAILED" if code is not None else " KILLED (out of time)")
    head = f"GradInit cost on {device_name} ({time.time() - start:.0f}s){status}:"
    for t in tables:
        (t / f"{prefix}-cost.md").write_text(head + "\n\n" + text.strip() + "\n")
    print(head, "\n", text, flush=True)
    return f"- {prefix}-cost.md: bench/cost.py {' '.join(cfg['cost'])}{status}"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    R.install_stop_handler()
    main()
