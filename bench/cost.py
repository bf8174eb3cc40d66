"""What one GradInit iteration costs next to one ordinary training step.

    .venv/bin/python bench/cost.py                     # Multi30k, both model sizes, CPU
    .venv/bin/python bench/cost.py --data DATA_BIN --models iwslt --device cuda

For each model, four modes run in separate child processes on the same real batches
(so that each peak memory is its own): a training step (forward, backward, Adam step,
dropout on), a GradInit iteration in the objective branch (at a finite gamma, as at the
default, so that S's forward is kept for a constraint step), one in the constraint branch
(the default: exact Hessian-vector product over --gradinit-hvp-chunks micro-batches of
S) and one in the constraint branch with --gradinit-second-order autograd (eval mode,
the default GradInit batch: one training batch of --max-tokens split into S and S~,
2/3 of it each). A fifth child compares the two constraint gradients on each GradInit
batch: the share of scales whose gradient, clamped at --gradinit-grad-clip 1 as the
constraint step clamps it, has the same sign (the lowest over the batches), and the
cosine of the clamped gradients. Times are medians over --repeats after --warmup
iterations: on a GPU wall-clock seconds; on the CPU the child's CPU seconds with torch on
one thread, which other processes on a shared machine do not inflate (wall time there
can triple from one child to the next). Memory is the child's peak (CPU: max RSS of the
whole process; GPU: torch.cuda.max_memory_allocated). Everything is printed as a ratio
to the training step, with the targets from the project's issue.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import machine_line  # noqa: E402
from multi30k import prepare_multi30k  # noqa: E402

MODELS = {
    "iwslt": ["--arch", "transformer_iwslt_de_en", "--share-decoder-input-output-embed"],
    "small": [
        "--arch", "transformer", "--share-decoder-input-output-embed",
        "--encoder-layers", "6", "--decoder-layers", "6",
        "--encoder-embed-dim", "256", "--decoder-embed-dim", "256",
        "--encoder-ffn-embed-dim", "1024", "--decoder-ffn-embed-dim", "1024",
        "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
    ],
    # for the bench's own test: every mode in seconds
    "tiny": [
        "--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1",
        "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
        "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
        "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    ],
}  # fmt: skip
#: constraint: the default Hessian-vector product over micro-batches; autograd: the
#: double backward through the whole batch (--gradinit-second-order autograd);
#: agreement: the two constraint gradients compared (no timing).
MODES = ("train", "objective", "constraint", "autograd", "agreement")
TARGETS = {"objective": 1.6, "constraint": 2.5, "autograd": 2.5}
MEMORY_TARGET = 1.3
AGREEMENT_TARGET = 0.95
#: a clamped scale gradient below this fraction of the largest counts as zero
ROUNDING = 1e-6
PAPER_ITERS, PAPER_UPDATES = 780, 100_000
START = time.perf_counter()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="fairseq data-bin; default: Multi30k prepared under bench/work/")
    parser.add_argument("--models", default="iwslt,small", help=f"comma list of {sorted(MODELS)}")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", help="where to write the table; default: bench/results/cost-<device>.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # mode:model, run by this script
    args = parser.parse_args()
    if args.child:
        return child(args)
    data = args.data or str(prepare_multi30k())
    rows = []
    for model in args.models.split(","):
        results = {mode: run_child(args, data, mode, model) for mode in MODES}
        rows.append((model, results))
        report(rows, args, final=model == args.models.split(",")[-1])  # a table after each model


def run_child(args, data, mode, model) -> dict:
    command = [sys.executable, __file__, "--child", f"{mode}:{model}", "--data", data,
               "--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats),
               "--warmup", str(args.warmup), "--device", args.device]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench/cost.py: {mode} on {model} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if mode == "agreement":
        print(f"  {model:6s} {mode:10s} {result['agreement']:.1%} of signs, cosine {result['cosine']:.5f}", flush=True)
    else:
        print(f"  {model:6s} {mode:10s} median {result['seconds']:.3f}s  peak {result['peak_mb']:.0f} MB", flush=True)
    return result


def child(args):
    import torch

    mode, model_name = args.child.split(":")
    task, model, criterion, batches = build(args, model_name)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # CPU seconds of one thread: see the module docstring
    model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n = args.warmup + args.repeats
    if mode == "agreement":
        print(json.dumps(agreement(task, model, criterion, batches["gradinit"][:n])))
        return
    times = train_times(model, criterion, batches["train"], n) if mode == "train" else \
        gradinit_times(task, model, criterion, batches["gradinit"], n, mode)  # fmt: skip
    seconds = statistics.median(times[args.warmup :])
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb, "params": params, "times": times}))


def build(args, model_name):
    import fairseq_gradinit  # noqa: F401  (registers the task)
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from fairseq_gradinit.config import gradinit_max_tokens
    from fairseq_gradinit.fairseq_batches import sample_pairs

    argv = [args.data, *MODELS[model_name], "--optimizer", "adam", "--lr", "5e-4",
            "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
            "--max-tokens", str(args.max_tokens), "--dropout", "0.1", "--seed", "1"]  # fmt: skip
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    utils.set_torch_seed(1)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    n = args.warmup + args.repeats
    itr = task.get_batch_iterator(
        dataset=task.dataset("train"), max_tokens=args.max_tokens, seed=1, disable_iterator_cache=True,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
    ).next_epoch_itr(shuffle=True)  # fmt: skip
    train_batches = [next(itr) for _ in range(n)]
    max_tokens, max_sentences = gradinit_max_tokens(cfg.task)  # the plugin's default GradInit batch
    pairs = sample_pairs(task, model, max_tokens, max_sentences, 0.5, seed=1)
    gradinit_batches = [next(pairs) for _ in range(n)]
    if args.device == "cuda":
        train_batches = [utils.move_to_cuda(b) for b in train_batches]
        gradinit_batches = [tuple(utils.move_to_cuda(x) for x in p) for p in gradinit_batches]
    return task, model, criterion, {"train": train_batches, "gradinit": gradinit_batches}


def train_times(model, criterion, batches, n):
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.98))
    model.train()
    times = []
    for sample in batches[:n]:
        start = _now()
        loss, sample_size, _ = criterion(model, sample)
        (loss / sample_size).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(_now() - start)
    return times


def loss_of(task, criterion):
    from fairseq_gradinit.fairseq_batches import criterion_loss

    return criterion_loss(criterion, task.target_dictionary.pad())  # as the plugin's hook


def gradinit_times(task, model, criterion, pairs, n, mode):

    from fairseq_gradinit.core import AUTOGRAD, HVP, GradInitSettings, gradinit

    # Force the branch. The objective's gamma is finite, as at the default: the constraint
    # may act, so S runs as micro-batches on the math attention kernel and its graph is kept.
    gamma = 1e30 if mode == "objective" else 1e-12
    second_order = AUTOGRAD if mode == "autograd" else HVP
    settings = GradInitSettings(iters=n, eta=5e-4, target="adam", gamma=gamma, second_order=second_order)
    stamps = [_now()]
    loss_fn = loss_of(task, criterion)

    result = gradinit(model, loss_fn, pairs, settings, on_iteration=lambda r: stamps.append(_now()))
    assert all(r.branch == ("objective" if mode == "objective" else "constraint") for r in result.history)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def agreement(task, model, criterion, pairs):
    """Default (hvp) vs autograd constraint gradient on each batch's S, clamped at 1 as
    the constraint step clamps it: the share of same signs and the cosine, worst batch."""
    import torch

    from fairseq_gradinit.core import AUTOGRAD, HVP, GradInitSettings, norm_gradient

    same, cosine, zero = [], [], []
    for s, _ in pairs:
        grads = {
            mode: norm_gradient(model, loss_of(task, criterion), s, GradInitSettings(second_order=mode)).clamp(-1, 1)
            for mode in (HVP, AUTOGRAD)
        }
        hvp, exact = grads[HVP], grads[AUTOGRAD]
        # Scales whose gradient is zero but for float32 rounding (the key biases: softmax
        # ignores a constant added to every key's score) have no sign to agree on.
        counted = torch.maximum(hvp.abs(), exact.abs()) > ROUNDING * exact.abs().max()
        same.append((hvp.sign() == exact.sign())[counted].double().mean().item())
        zero.append(int((~counted).sum()))
        cosine.append(torch.nn.functional.cosine_similarity(hvp, exact, dim=0).item())
    return {"agreement": min(same), "cosine": min(cosine), "scales": len(hvp), "zero": max(zero), "batches": len(pairs)}


def _now():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def report(rows, args, final=True):
    """Write the table to --out (and print it at the end)."""
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        table(rows, args)
    if final:
        print("\n" + text.getvalue(), end="")
    out = Path(args.out or ROOT / "bench" / "results" / f"cost-{args.device}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text.getvalue())
    print(f"wrote {out}")


def table(rows, args):
    from fairseq_gradinit.core import GradInitSettings

    chunks = GradInitSettings().hvp_chunks
    clock = "wall-clock seconds" if args.device == "cuda" else "CPU seconds, one thread"
    print(f"GradInit cost, {args.device} ({clock}), --max-tokens {args.max_tokens}, median of {args.repeats} "
          f"after {args.warmup} warm-up (ratios to one training step)\n")  # fmt: skip
    print(f"| model | params | train step | objective iter | constraint iter (default: hvp, {chunks} chunks) | "
          "constraint iter, autograd | peak mem: objective | peak mem: constraint | peak mem: constraint, autograd | "
          "constraint sign agreement hvp vs autograd, clamped (cosine) | GradInit share of 780 iters + 100k updates |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model, r in rows:
        train = r["train"]

        def ratio(mode, key="seconds", target=None):
            value = r[mode][key] / train[key]
            mark = "" if target is None else (" ok" if value <= target else f" MISSES {target}x")
            return f"{value:.2f}x{mark}"

        share = PAPER_ITERS * r["objective"]["seconds"]
        share /= share + PAPER_UPDATES * train["seconds"]
        agree = r["agreement"]
        mark = " ok" if agree["agreement"] >= AGREEMENT_TARGET else f" MISSES {AGREEMENT_TARGET:.0%}"
        print(f"| {model} | {train['params'] / 1e6:.1f}M | {train['seconds']:.3f}s, {train['peak_mb']:.0f} MB "
              f"| {ratio('objective', target=TARGETS['objective'])} "
              f"| {ratio('constraint', target=TARGETS['constraint'])} "
              f"| {ratio('autograd', target=TARGETS['autograd'])} "
              f"| {ratio('objective', 'peak_mb', MEMORY_TARGET)} "
              f"| {ratio('constraint', 'peak_mb', MEMORY_TARGET)} "
              f"| {ratio('autograd', 'peak_mb', MEMORY_TARGET)} "
              f"| {agree['agreement']:.1%}{mark} ({agree['cosine']:.4f}; {agree['scales']} scales, "
              f"{agree['zero']} zero but for rounding; lowest of {agree['batches']} batches) | {share:.2%} |")  # fmt: skip
    seconds = time.perf_counter() - START
    print(f"\ncommand: {' '.join([os.path.relpath(sys.executable, os.getcwd())] + sys.argv)} "
          f"(whole bench: {seconds / 60:.0f} min)")  # fmt: skip
    print(machine_line(args.device))


if __name__ == "__main__":
    main()
