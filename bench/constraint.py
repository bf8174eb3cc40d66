"""What GradInit's gradient-norm constraint does, at several gamma, on one small model.

    .venv/bin/python bench/constraint.py                    # Multi30k, 2+2 x 64 Post-LN, CPU, minutes
    .venv/bin/python bench/constraint.py --model small      # the 6+6 x 256 model of bench/stability.py

From one initialization and one stream of (S, S~) batches (the plugin's own batching,
--max-tokens 4096), GradInit runs once per gamma setting (Adam target, eta = --lr,
exact second order, the other settings as given), then the scaled model trains
--updates Adam updates without warmup (lr decaying linearly to 0, dropout 0.1); the
same for no GradInit ("vanilla") and for a linear warmup over the first 30% of the
updates ("warmup"). For each run the table gives: the iterations in the constraint
branch (all, and among the first 20), the l1 gradient norm at the first and the last
iteration, the weight tensors pinned at the floor (scale <= 1.5 x --gradinit-min-scale),
the scales' min / mean / max, and the validation loss after training. Writes
bench/results/constraint-<model>-lr<lr>.md (or --out).
"""
import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from multi30k import prepare_multi30k  # noqa: E402

MODELS = {
    "mini": ["--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "64",
             "--decoder-embed-dim", "64", "--encoder-ffn-embed-dim", "256", "--decoder-ffn-embed-dim", "256",
             "--encoder-attention-heads", "4", "--decoder-attention-heads", "4"],
    "small": ["--encoder-layers", "6", "--decoder-layers", "6", "--encoder-embed-dim", "256",
              "--decoder-embed-dim", "256", "--encoder-ffn-embed-dim", "1024", "--decoder-ffn-embed-dim", "1024",
              "--encoder-attention-heads", "4", "--decoder-attention-heads", "4"],
}  # fmt: skip
#: gamma settings: name -> (absolute gamma, factor of the first iteration's l1 norm).
#: 0.04 is the authors' IWSLT'14 ratio (gamma 1000 for an initial l1 norm of ~2.5e4).
GAMMAS = {
    "gamma inf (no constraint)": (math.inf, None),
    "1.25 x first norm (default)": (math.inf, 1.25),
    "0.2 x first norm": (math.inf, 0.2),
    "0.04 x first norm (authors' ratio)": (math.inf, 0.04),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="fairseq data-bin; default: Multi30k prepared under bench/work/")
    p.add_argument("--model", choices=sorted(MODELS), default="mini")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--updates", type=int, default=100)
    p.add_argument("--iters", type=int, default=80, help="GradInit iterations")
    p.add_argument("--tau", type=float, default=1.5e-2, help="--gradinit-lr")
    p.add_argument("--min-scale", type=float, default=0.01)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out")
    args = p.parse_args(argv)
    data = args.data or str(prepare_multi30k())
    start = time.perf_counter()
    rows = [run(args, data, name, gamma) for name, gamma in [("vanilla", None), ("warmup", None), *GAMMAS.items()]]
    lines = table(args, rows)
    lines.append(f"\ncommand: {' '.join(['.venv/bin/python', 'bench/constraint.py', *(argv or sys.argv[1:])])} "
                 f"(whole bench: {(time.perf_counter() - start) / 60:.0f} min on this machine)")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out or ROOT / "bench" / "results" / f"constraint-{args.model}-lr{args.lr:g}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


def build(args, data):
    import fairseq_gradinit  # noqa: F401  (registers the task)
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    argv = [data, "--arch", "transformer", "--share-decoder-input-output-embed", *MODELS[args.model],
            "--optimizer", "adam", "--lr", str(args.lr), "--criterion", "label_smoothed_cross_entropy",
            "--label-smoothing", "0.1", "--max-tokens", str(args.max_tokens), "--dropout", "0.1",
            "--seed", str(args.seed)]  # fmt: skip
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    utils.set_torch_seed(args.seed)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    task.load_dataset("valid")
    model = task.build_model(cfg.model)
    return task, model, task.build_criterion(cfg.criterion)


def batches(task, model, split, max_tokens, seed):
    from fairseq import utils

    return task.get_batch_iterator(
        dataset=task.dataset(split), max_tokens=max_tokens, seed=seed, disable_iterator_cache=True,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
    )  # fmt: skip


def run(args, data, name, gamma):
    import torch

    from fairseq_gradinit.core import GradInitSettings, apply_scales, gradinit
    from fairseq_gradinit.fairseq_batches import sample_pairs
    from fairseq_gradinit.selection import select_tensors

    task, model, criterion = build(args, data)  # same seed: same initialization every run
    model.to(args.device)

    def loss_fn(m, sample):
        loss, size, _ = criterion(m, sample)
        return loss, size

    row = {"name": name}
    if gamma is not None:
        settings = GradInitSettings(iters=args.iters, eta=args.lr, lr=args.tau, gamma=gamma[0],
                                    gamma_factor=gamma[1], min_scale=args.min_scale)  # fmt: skip
        pairs = sample_pairs(task, model, args.max_tokens, None, 0.5, seed=args.seed)
        result = gradinit(model, loss_fn, pairs, settings)
        apply_scales(model, result.scales)
        history = result.history
        kinds = select_tensors(model)
        floor = [n for n, v in result.scales.items() if kinds[n] == "weight" and v <= 1.5 * args.min_scale]
        row.update(
            constraint=sum(r.branch == "constraint" for r in history),
            first20=sum(r.branch == "constraint" for r in history[:20]),
            norms=(history[0].grad_norm, history[-1].grad_norm, history[0].gamma),
            floor=floor,
            scales=(min(result.scales.values()), sum(result.scales.values()) / len(result.scales),
                    max(result.scales.values())),
            seconds=result.seconds,
        )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    warm = int(0.3 * args.updates) if name == "warmup" else 0
    model.train()
    itr = batches(task, model, "train", args.max_tokens, args.seed)
    epoch = itr.next_epoch_itr(shuffle=True)
    for update in range(args.updates):
        sample = next(epoch, None)
        if sample is None:
            epoch = itr.next_epoch_itr(shuffle=True)
            sample = next(epoch)
        lr = args.lr * (1 - update / args.updates)
        if warm:
            lr = min(lr, args.lr * (update + 1) / warm)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, size, _ = criterion(model, _to(sample, args.device))
        optimizer.zero_grad(set_to_none=True)
        (loss / size).backward()
        optimizer.step()
    row["valid"] = validate(task, model, criterion, args)
    print(f"{name}: valid loss {row['valid']:.3f}" + (f", {row['constraint']}/{args.iters} constraint"
          f" iterations, {len(row['floor'])} tensors at the floor" if gamma else ""), flush=True)  # fmt: skip
    return row


def validate(task, model, criterion, args) -> float:
    import torch

    model.eval()
    total, size = 0.0, 0
    with torch.no_grad():
        for sample in batches(task, model, "valid", args.max_tokens, args.seed).next_epoch_itr(shuffle=False):
            loss, n, _ = criterion(model, _to(sample, args.device))
            total, size = total + loss.item(), size + n
    return total / size / math.log(2)  # fairseq logs the loss in base 2


def table(args, rows):
    lines = [
        f"GradInit's constraint on Multi30k, {args.model} Post-LN model, seed {args.seed}: {args.iters} GradInit "
        f"iterations at tau {args.tau:g} (Adam target, eta = lr = {args.lr:g}, exact second order, floor "
        f"{args.min_scale:g}), then {args.updates} Adam updates without warmup (warmup: linear over "
        f"{int(0.3 * args.updates)}), --max-tokens {args.max_tokens}, {args.device}",
        "",
        "| run | gamma | constraint iterations (first 20) | l1 norm first -> last | weight tensors at the floor "
        "| scales min / mean / max | GradInit time | valid loss (base 2) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "constraint" not in r:
            lines.append(f"| {r['name']} | | | | | | | {r['valid']:.3f} |")
            continue
        first, last, gamma = r["norms"]
        floor = ", ".join(_short(n) for n in r["floor"]) or "none"
        lines.append(
            f"| GradInit | {r['name']}: {gamma:.4g} | {r['constraint']}/{args.iters} ({r['first20']}/20) "
            f"| {first:.4g} -> {last:.4g} | {len(r['floor'])}: {floor} | "
            f"{r['scales'][0]:.3f} / {r['scales'][1]:.3f} / {r['scales'][2]:.3f} | {r['seconds']:.0f} s "
            f"| {r['valid']:.3f} |"
        )
    return lines


def _to(sample, device):
    from fairseq import utils

    return utils.move_to_cuda(sample) if device == "cuda" else sample


def _short(name: str) -> str:
    return (name.replace("encoder.layers.", "enc").replace("decoder.layers.", "dec").replace(".weight", "")
            .replace("self_attn.", "sa.").replace("encoder_attn.", "ea."))  # fmt: skip


if __name__ == "__main__":
    main()
