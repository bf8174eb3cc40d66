"""Deep Post-LN without warmup on real text: every initialization of the plugin, side by side.

    python bench/depth.py                          # CPU: 8+8 layers x 64, 150 updates, 2 seeds
    python bench/depth.py --scale gpu --device cuda --jobs 9   # 18+18 x 128, fp16, 2000 updates
    python bench/depth.py --methods vanilla,deepnet --seeds 1 --no-bleu

Multi30k De-En (bench/multi30k.py), a deep narrow encoder-decoder, Adam (0.9, 0.98), lr
decayed linearly to 0 over the run, no gradient clipping, the same seeds for every method:

    vanilla         Post-LN, no warmup (the failure case)
    warmup          Post-LN, linear warmup over --warmup updates
    preln           Pre-LN, no warmup
    admin           transformer_wskip, --wskip-init admin (Admin, profiling)
    admin-analytic  transformer_wskip, --wskip-init admin-analytic (Admin, closed form)
    deepnet         transformer_wskip, --wskip-init deepnet (DeepNorm alpha and beta)
    tfixup          transformer_tfixup (no LayerNorm, T-Fixup initialization)
    gradinit        Post-LN + --gradinit (Adam target)
    gradinit-wskip  transformer_wskip + --gradinit --gradinit-wskip (w_skip scaled too)

Every run is stock fairseq (``python -m fairseq_cli.train``, so no console scripts are
needed) with this plugin; --jobs N runs N at once (each with cores/N threads). Writes
RESULTS/depth-SCALE.md (validation loss at fixed updates, failures, final nll, BLEU,
GradInit's scales per tensor kind), depth-SCALE.png (curves) and depth-SCALE.json; the
runs themselves live under --out. A run whose result.json holds the same command is not
run again (--fresh starts over). "failed" is defined in the table's footnote: diverged
(a non-finite loss) or stuck (final validation nll at or above the unigram entropy of
the training targets).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import runs as R  # noqa: E402
from multi30k import prepare_multi30k  # noqa: E402

METHODS = ("vanilla", "warmup", "preln", "admin", "admin-analytic", "deepnet", "tfixup", "gradinit",
           "gradinit-wskip")  # fmt: skip

#: model (arch family, layers, width, FFN, heads, dropout) and schedule of each scale.
#: cpu: sized so that 9 methods x 2 seeds fit ~40 minutes on 2 shared cores; at 8+8 x 64
#: and lr 2e-3 Post-LN without warmup already stays at the unigram loss (measured: valid
#: nll 8.45 after 100 updates; Pre-LN 7.82 after 50). With --layers 18,18 (same lr)
#: Post-LN stays there even with warmup while Pre-LN learns (bench/results/
#: depth-cpu-18layers.md). gpu: that depth and lr, the issue's 128 wide (FFN 512), fp16,
#: 4x the batch and long enough for BLEU. tiny: the test suite's.
#: GradInit: iterations x tau about 1 (README "Short GradInit runs"), eta = lr.
SCALES = {
    "cpu": dict(arch="transformer", layers=(8, 8), dim=64, ffn=256, heads=4, dropout=0.1, lr=2e-3,
                updates=150, warmup=50, interval=25, max_tokens=1024, gradinit_iters=40, gradinit_lr=2.5e-2,
                fp16=False),
    "gpu": dict(arch="transformer", layers=(18, 18), dim=128, ffn=512, heads=4, dropout=0.1, lr=2e-3,
                updates=2000, warmup=500, interval=100, max_tokens=4096, gradinit_iters=100, gradinit_lr=1.5e-2,
                fp16=True),
    "tiny": dict(arch="transformer", layers=(2, 2), dim=16, ffn=32, heads=2, dropout=0.1, lr=1e-3,
                 updates=4, warmup=2, interval=2, max_tokens=1024, gradinit_iters=3, gradinit_lr=1e-2,
                 fp16=False),
}  # fmt: skip


def arch_of(method: str, arch: str) -> str:
    """The registered arch of a method: transformer[_iwslt_de_en] -> transformer_wskip[...]."""
    if method in ("admin", "admin-analytic", "deepnet", "gradinit-wskip"):
        return arch.replace("transformer", "transformer_wskip", 1)
    if method == "tfixup":
        return arch.replace("transformer", "transformer_tfixup", 1)
    return arch


def method_args(method: str, arch: str, model: list, gradinit_iters: int, gradinit_lr: float) -> list:
    """fairseq flags of one method on top of the model's size flags."""
    args = ["--arch", arch_of(method, arch), *model]
    args += {
        "preln": ["--encoder-normalize-before", "--decoder-normalize-before"],
        "admin": ["--wskip-init", "admin"],
        "admin-analytic": ["--wskip-init", "admin-analytic"],
        "deepnet": ["--wskip-init", "deepnet"],
        "tfixup": ["--tfixup-init", "tfixup"],
        "gradinit-wskip": ["--wskip-init", "ones", "--gradinit-wskip"],
    }.get(method, [])
    if method.startswith("gradinit"):
        args += ["--gradinit", "--gradinit-iters", str(gradinit_iters), "--gradinit-lr", str(gradinit_lr)]
    return args


def model_flags(s: dict) -> list:
    enc, dec = s["layers"]
    return ["--encoder-layers", str(enc), "--decoder-layers", str(dec),
            "--encoder-embed-dim", str(s["dim"]), "--decoder-embed-dim", str(s["dim"]),
            "--encoder-ffn-embed-dim", str(s["ffn"]), "--decoder-ffn-embed-dim", str(s["ffn"]),
            "--encoder-attention-heads", str(s["heads"]), "--decoder-attention-heads", str(s["heads"]),
            "--dropout", str(s["dropout"])]  # fmt: skip


def build_runs(s: dict, methods, seeds, out: Path, device: str, extra_model=()) -> list:
    """One R.Run per (seed, method) of scale settings s."""
    runs = []
    for seed in seeds:
        for m in methods:
            args = method_args(m, s["arch"], [*model_flags(s), *extra_model], s["gradinit_iters"], s["gradinit_lr"])
            runs.append(R.Run(method=m, seed=seed, save_dir=out / f"{m}-seed{seed}", args=args,
                              updates=s["updates"], lr=s["lr"], interval=s["interval"],
                              max_tokens=s["max_tokens"], device=device, fp16=s["fp16"] and device == "cuda",
                              warmup=s["warmup"] if m == "warmup" else 0))  # fmt: skip
    return runs


def describe(s: dict, device: str, seeds: int, data: str) -> str:
    enc, dec = s["layers"]
    return (f"{data}, Post-LN {enc}+{dec} layers, {s['dim']} wide, FFN {s['ffn']}, {s['heads']} heads, "
            f"dropout {s['dropout']}; Adam (0.9, 0.98), lr {s['lr']} decayed linearly to 0 over "
            f"{s['updates']} updates, no clipping, max-tokens {s['max_tokens']}, "
            f"{'fp16' if s['fp16'] and device == 'cuda' else 'fp32'} on {device}, seeds 1..{seeds}; 'warmup' "
            f"warms up over {s['warmup']} updates; GradInit {s['gradinit_iters']} iterations, "
            f"tau {s['gradinit_lr']}, eta = lr.")  # fmt: skip


def data_label(data: Path) -> str:
    return "Multi30k De-En" if data.resolve().parts[-2:] == ("multi30k", "data-bin") else f"`{data}`"


def write_outputs(results, unigram, results_dir: Path, stem: str, header: str, command: str) -> Path:
    """RESULTS/STEM.md, .json and .png from the runs so far."""
    results_dir.mkdir(parents=True, exist_ok=True)
    lines = R.table(results, unigram, header)
    pattern = R.scales_pattern(results)
    if pattern:
        lines += ["", *pattern]
    lines += ["", f"command: {command}"]
    md = results_dir / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n")
    slim = [{k: v for k, v in r.items() if k != "scales"} | ({"scales": r["scales"]["scales"]} if r.get("scales") else {})
            for r in results]  # fmt: skip
    (results_dir / f"{stem}.json").write_text(json.dumps({"unigram_bits": unigram, "runs": slim}, indent=1) + "\n")
    if any(r.get("train") or r.get("valid_nll") for r in results):
        R.plot(results, unigram, results_dir / f"{stem}.png", stem)
    return md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="fairseq data-bin with a joined dictionary; default: Multi30k under bench/work/")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    p.add_argument("--seeds", type=int, default=2, help="run seeds 1..N")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cores/N threads)")
    p.add_argument("--layers", help="ENC,DEC layers instead of the scale's")
    for key in ("updates", "warmup", "interval", "max_tokens", "gradinit_iters"):
        p.add_argument("--" + key.replace("_", "-"), type=int)
    for key in ("lr", "gradinit_lr"):
        p.add_argument("--" + key.replace("_", "-"), type=float)
    p.add_argument("--budget-minutes", type=float, help="stop starting runs, and stop training, after this")
    p.add_argument("--out", help="where the runs live (default bench/work/depth-SCALE)")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where the tables go")
    p.add_argument("--name", help="file stem of the tables (default depth-SCALE)")
    p.add_argument("--no-bleu", action="store_true", help="skip beam search on the test set")
    p.add_argument("--fresh", action="store_true", help="run everything again")
    a = p.parse_args(argv)
    s = dict(SCALES[a.scale])
    for key in ("updates", "warmup", "interval", "max_tokens", "gradinit_iters", "lr", "gradinit_lr"):
        if getattr(a, key) is not None:
            s[key] = getattr(a, key)
    if a.layers:
        try:
            s["layers"] = tuple(int(x) for x in a.layers.split(","))
            assert len(s["layers"]) == 2 and min(s["layers"]) > 0
        except (ValueError, AssertionError):
            p.error(f"--layers {a.layers}: expected ENC,DEC, two positive integers")
    methods = a.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no GPU")
    data = Path(a.data) if a.data else prepare_multi30k()
    if not list(data.glob("dict.*.txt")):
        p.error(f"--data {data}: no fairseq dictionary there (run fairseq-preprocess first)")
    out = Path(a.out or ROOT / "bench" / "work" / f"depth-{a.scale}")
    stem = a.name or f"depth-{a.scale}"
    unigram = R.unigram_bits(data)
    header = describe(s, a.device, a.seeds, data_label(data))
    command = " ".join(["bench/depth.py", *(argv if argv is not None else sys.argv[1:])])
    runs = build_runs(s, methods, range(1, a.seeds + 1), out, a.device)
    seconds = a.budget_minutes * 60 if a.budget_minutes else None
    budget = R.Budget(seconds, reserve=0 if a.no_bleu or not seconds else min(60, seconds / 10), min_start=30)
    start = time.time()
    results = R.run_all(runs, data, budget, jobs=a.jobs, bleu=not a.no_bleu, fresh=a.fresh,
                        on_result=lambda rs: write_outputs(rs, unigram, Path(a.results), stem, header, command))  # fmt: skip
    md = write_outputs(results, unigram, Path(a.results), stem, header, command)
    print(md.read_text())
    print(f"wrote {md} and {stem}.png/.json beside it ({(time.time() - start) / 60:.1f} min)")
    return results


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    R.install_stop_handler()
    main()
