#!/usr/bin/env python3
"""End-to-end GradInit demo: data -> fairseq-train --gradinit -> summary -> translations.

    .venv/bin/python examples/demo/run_demo.py                 # German->English number words
    .venv/bin/python examples/demo/run_demo.py --data DIR --src de --tgt en
    .venv/bin/python examples/demo/run_demo.py --no-gradinit   # the same run without GradInit

Steps, all under the work directory (default: demo-work/ at the repository root):

  1. without --data, write the offline number-words corpus (examples/demo/number_words.py)
     to demo-work/raw-number-words/; with --data, use DIR/{train,valid|val,test}.{src,tgt};
  2. sentencepiece + fairseq-preprocess it (examples/prepare_data.py) into
     demo-work/prep-*/, skipped when that is newer than the raw files;
  3. run the venv's stock fairseq-train with --user-dir fairseq_gradinit --gradinit on a
     small Post-LN Transformer, without warmup, into a fresh demo-work/runs/<time>-*/
     (full log in its train.log; the console gets the GradInit lines and one line per
     validation);
  4. summarize what GradInit did (gradinit_scales.json) and the validation loss curve, then
     translate the test set with fairseq-generate (beam 5) and show a few examples + BLEU.

Arguments after a literal "--" go to fairseq-train unchanged (they override the demo's
settings), e.g. ``run_demo.py -- --gradinit-gamma 5000 --lr 7e-4``.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
USER_DIR = REPO / "fairseq_gradinit"
BIN_DIR = Path(sys.executable).parent  # the venv's bin/, where fairseq-train lives

# Demo corpus: vocabulary of the joined sentencepiece model (the corpus has ~120 distinct
# pieces at this size; see prepare_data.train_spm) and a larger default for user data.
DEMO_VOCAB = 200
USER_VOCAB = 8000

# Sized for 2 CPU cores: ~1M parameters, ~4.5 updates/s of 2000 tokens. Measured on an
# otherwise idle 2-core machine with the number-words corpus: GradInit (100 iterations)
# ~35 s, 800 updates ~3 min, test-set decoding ~10 s, ~4 min in all; validation loss
# falls from ~2.5 at update 100 to ~1.18 (the label-smoothing floor) and >99% of the test
# sentences come out exactly right. Other processes on the same cores slow it a lot.
DEFAULT_MAX_UPDATE = 800
DEFAULT_GRADINIT_ITERS = 100
VALIDATE_EVERY = 100
N_EXAMPLES = 8
LOG_TAIL = 30

MODEL_ARGS = [
    "--arch", "transformer",  # fairseq's Transformer is Post-LN unless told otherwise
    "--encoder-layers", "3", "--decoder-layers", "3",
    "--encoder-embed-dim", "128", "--decoder-embed-dim", "128",
    "--encoder-ffn-embed-dim", "256", "--decoder-ffn-embed-dim", "256",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
    "--share-decoder-input-output-embed",  # as in the README's IWSLT command
    "--dropout", "0.1",
]


class DemoError(Exception):
    """A step failed; the message says which and why."""


def load_module(name: str, path: Path):
    """Import a script by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def say(text: str = "") -> None:
    print(text, flush=True)


def fmt_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


# ----------------------------------------------------------------------------- data


def demo_corpus(workdir: Path) -> Path:
    """Write the number-words corpus once (again only if its generator changed)."""
    numbers_py = HERE / "number_words.py"
    raw = workdir / "raw-number-words"
    files = [raw / f"{split}.{lang}" for split in ("train", "valid", "test") for lang in ("de", "en")]
    if all(f.exists() for f in files) and min(f.stat().st_mtime for f in files) >= numbers_py.stat().st_mtime:
        say(f"corpus: {raw} (already there)")
        return raw
    numbers = load_module("_demo_number_words", numbers_py)
    numbers.write_corpus(raw)
    say(f"corpus: wrote the German->English number-words corpus to {raw}")
    return raw


def raw_files(raw: Path, src: str, tgt: str):
    return [raw / f"{stem}.{lang}" for stem in ("train", "valid", "val", "test")
            for lang in (src, tgt) if (raw / f"{stem}.{lang}").exists()]


def prepare_data(raw: Path, prep: Path, src: str, tgt: str, vocab: int) -> Path:
    """Binarize raw into prep/data-bin unless a finished preparation is newer than raw."""
    data_bin = prep / "data-bin"
    stamp = prep / ".prepared"
    wanted = {"raw": str(raw.resolve()), "src": src, "tgt": tgt, "vocab_size": vocab}
    inputs = raw_files(raw, src, tgt)
    if stamp.exists() and inputs and (prep / "spm.model").exists() and data_bin.is_dir():
        try:
            done = json.loads(stamp.read_text())
        except ValueError:
            done = None
        if done == wanted and stamp.stat().st_mtime >= max(f.stat().st_mtime for f in inputs):
            say(f"data:   {data_bin} (up to date, not rebuilt)")
            return data_bin
    prepare = load_module("_demo_prepare_data", REPO / "examples" / "prepare_data.py")
    say(f"data:   sentencepiece (vocab {vocab}) + fairseq-preprocess -> {data_bin} ...")
    start = time.time()
    stamp.unlink(missing_ok=True)
    try:
        data_bin = prepare.prepare(raw, prep, src, tgt, vocab, workers=1)
    except prepare.DataError as e:
        raise DemoError(f"cannot prepare {raw}: {e}") from None
    stamp.write_text(json.dumps(wanted))
    say(f"        done in {fmt_seconds(time.time() - start)}")
    return data_bin


# ----------------------------------------------------------------------------- running


def tool(name: str):
    """The venv's console script, or the equivalent `python -m fairseq_cli.X`."""
    script = BIN_DIR / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "fairseq_cli." + name.split("-", 1)[1]]


def run_logged(cmd, log_path: Path, on_line=None) -> None:
    """Run cmd, append its output to log_path, pass each line to on_line; raise on failure."""
    with open(log_path, "a", encoding="utf-8") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                encoding="utf-8", errors="replace", bufsize=1, env=env,
                                cwd=log_path.parent)
        try:
            for line in proc.stdout:
                log.write(line)
                if on_line is not None:
                    on_line(line.rstrip("\n"))
            proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if proc.returncode != 0:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        tail = "\n".join("  | " + line for line in lines[-LOG_TAIL:])
        name = " ".join(cmd[1:3]) if cmd[0] == sys.executable else Path(cmd[0]).name
        raise DemoError(f"{name} failed with exit code {proc.returncode}; last lines of {log_path}:\n"
                        f"{tail}")


# fairseq "simple" log lines: "<date> <time> | INFO | <logger> | <message>"
LOG_LINE = re.compile(r"^\S+ \S+ \| \w+ \| (?P<logger>[\w.]+) \| (?P<msg>.*)$")
KV_EQ = re.compile(r"(\w+)=([-+\w.]+)")
KV_BAR = re.compile(r"\| (\w+) ([-+\w.]+)")


class TrainMonitor:
    """Echoes GradInit lines and one compact line per validation; keeps the loss curve."""

    def __init__(self):
        self.start = time.time()
        self.train_loss = None
        self.curve = []  # (update, valid loss, valid nll loss)
        self.gradinit_end = None

    def __call__(self, line: str) -> None:
        m = LOG_LINE.match(line)
        if not m:
            if line.startswith("fairseq-gradinit: error"):
                say("  " + line)
            return
        logger, msg = m.group("logger"), m.group("msg")
        if logger in ("gradinit", "fairseq_gradinit"):
            if msg.startswith("gradinit |"):
                return  # the end-of-GradInit summary line (iterations not a multiple of 10)
            if logger == "fairseq_gradinit" and "done in" in msg:
                self.gradinit_end = time.time()
            say(f"  [{fmt_seconds(time.time() - self.start):>6}] {msg.strip()}")
        elif logger == "train_inner":
            stats = dict(KV_EQ.findall(msg))
            if "loss" in stats:
                self.train_loss = float(stats["loss"])
        elif logger == "valid" and "valid on" in msg:
            stats = dict(KV_BAR.findall(msg))
            update = int(stats["num_updates"])
            loss, nll = float(stats["loss"]), float(stats["nll_loss"])
            self.curve.append((update, loss, nll))
            train = f"{self.train_loss:6.3f}" if self.train_loss is not None else "   n/a"
            say(f"  [{fmt_seconds(time.time() - self.start):>6}] update {update:5d} | "
                f"train loss {train} | valid loss {loss:6.3f} (nll {nll:.3f}, ppl {2 ** nll:.2f})")


def train_command(data_bin: Path, save_dir: Path, args, extra) -> list:
    every = str(min(VALIDATE_EVERY, args.max_update))
    cmd = tool("fairseq-train") + [
        str(data_bin), "--user-dir", str(USER_DIR),
        "--source-lang", args.src, "--target-lang", args.tgt,
        *MODEL_ARGS,
        "--optimizer", "adam", "--adam-betas", "(0.9,0.98)",
        "--lr", str(args.lr),
        # No warmup: the point of GradInit. Linear decay to 0 over the run.
        "--warmup-updates", "0", "--lr-scheduler", "polynomial_decay", "--power", "1",
        "--total-num-update", str(args.max_update), "--max-update", str(args.max_update),
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--max-tokens", "2000", "--seed", str(args.seed),
        # fairseq 0.12 drops the last batch of an epoch when its size is not a multiple
        # of this (default 8; facebookresearch/fairseq#5036): 4 of the 500 valid
        # sentences would never be scored. 1 keeps every sentence; it only matters on GPU.
        "--required-batch-size-multiple", "1",
        "--cpu", "--no-progress-bar", "--log-format", "simple",
        "--log-interval", every,
        # Validate (and keep checkpoint_best.pt) every VALIDATE_EVERY updates only, not
        # also at epoch ends, so the curve has evenly spaced points.
        "--validate-interval-updates", every, "--validate-interval", "1000",
        "--save-interval-updates", every, "--save-interval", "1000",
        "--keep-interval-updates", "1", "--no-epoch-checkpoints", "--no-last-checkpoints",
        "--save-dir", str(save_dir),
    ]
    if not args.no_gradinit:
        cmd += ["--gradinit", "--gradinit-iters", str(args.gradinit_iters)]
    return cmd + list(extra)


def fresh_run_dir(workdir: Path, label: str) -> Path:
    runs = workdir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    base = time.strftime("%Y%m%d-%H%M%S") + "-" + label
    for i in range(100):
        path = runs / (base if i == 0 else f"{base}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise DemoError(f"cannot create a fresh run directory under {runs}")


# ----------------------------------------------------------------------------- summary


def gradinit_summary(save_dir: Path) -> None:
    path = save_dir / "gradinit_scales.json"
    if not path.exists():
        say(f"GradInit: no {path} (did GradInit run?)")
        return
    info = json.loads(path.read_text())
    scales = info["scales"]
    values = sorted(scales.values())
    settings = info.get("settings", {})
    say("GradInit")
    say(f"  {len(scales)} tensors scaled, {info['iterations']} iterations "
        f"({info['constraint_iterations']} in the constraint branch, "
        f"{info['iterations'] - info['constraint_iterations']} in the objective branch), "
        f"{info['seconds']:.1f}s")
    if settings:
        # "gamma" at the top level is the bound GradInit used (for Adam by default a
        # multiple of the first iteration's gradient norm); settings.gamma is the flag.
        gamma = info.get("gamma", settings.get("gamma"))
        factor = settings.get("gamma_factor")
        how = f" = {factor:g} x first-iteration norm" if factor and settings.get("gamma") is None else ""
        say(f"  target {settings.get('target')}, eta {settings.get('eta')}, "
            f"gamma {'inf' if gamma is None else f'{gamma:.6g}'}{how}, "
            f"scale lr {settings.get('lr')}, batch {settings.get('max_tokens')} tokens")
    last = info.get("last_iteration", {})
    if last:
        say("  last iteration: " + ", ".join(f"{k} {v}" for k, v in last.items()))
    say(f"  scales: min {values[0]:.3f}  mean {sum(values) / len(values):.3f}  "
        f"max {values[-1]:.3f}")
    say("  most down-scaled:")
    for name, value in sorted(scales.items(), key=lambda kv: kv[1])[:5]:
        say(f"    {value:.3f}  {name}")
    say("  most up-scaled:")
    for name, value in sorted(scales.items(), key=lambda kv: -kv[1])[:3]:
        say(f"    {value:.3f}  {name}")


def curve_summary(curve) -> None:
    if not curve:
        say("validation loss: no validation ran")
        return
    say("validation loss (label-smoothed cross-entropy, bits/token)")
    top = max(loss for _, loss, _ in curve)
    for update, loss, nll in curve:
        bar = "#" * max(1, int(round(40 * loss / top)))
        say(f"  update {update:5d}  {loss:6.3f}  {bar}")
    first, best = curve[0], min(curve, key=lambda p: p[1])
    say(f"  best {best[1]:.3f} at update {best[0]} (nll {best[2]:.3f}, "
        f"perplexity {2 ** best[2]:.2f}); first validation {first[1]:.3f}")


def translate(data_bin: Path, save_dir: Path, args) -> None:
    split = "test" if list(data_bin.glob(f"test.{args.src}-{args.tgt}.{args.src}.bin")) else "valid"
    checkpoint = save_dir / "checkpoint_best.pt"
    if not checkpoint.exists():
        raise DemoError(f"no {checkpoint}; training saved no checkpoint")
    cmd = tool("fairseq-generate") + [
        str(data_bin), "--user-dir", str(USER_DIR), "--path", str(checkpoint),
        "--source-lang", args.src, "--target-lang", args.tgt, "--gen-subset", split,
        "--beam", "5", "--max-tokens", "4000", "--post-process", "sentencepiece",
        "--required-batch-size-multiple", "1",  # else up to 7 test sentences are skipped
        "--scoring", "sacrebleu", "--cpu", "--no-progress-bar", "--seed", str(args.seed),
    ]
    gen_log = save_dir / f"generate-{split}.log"
    out_lines = []
    start = time.time()
    say(f"translating the {split} set with checkpoint_best.pt (beam 5) ...")
    run_logged(cmd, gen_log, out_lines.append)
    src, ref, hyp = {}, {}, {}
    bleu = None
    for line in out_lines:
        if line.startswith(("S-", "T-", "H-")):
            key, _, rest = line.partition("\t")
            kind, idx = key.split("-", 1)
            if kind == "S":
                src[int(idx)] = rest
            elif kind == "T":
                ref[int(idx)] = rest
            else:
                hyp[int(idx)] = rest.partition("\t")[2]  # "H-i\tscore\ttext"
        elif "BLEU" in line and "Generate" in line:
            bleu = line[line.index("Generate"):]
    ids = sorted(hyp)
    exact = sum(hyp[i].strip() == ref.get(i, "").strip() for i in ids)
    say(f"example translations ({split} set, first {min(N_EXAMPLES, len(ids))} of {len(ids)}; "
        f"= exact match, x wrong)")
    for i in ids[:N_EXAMPLES]:
        mark = "=" if hyp[i].strip() == ref.get(i, "").strip() else "x"
        say(f"  {mark} source:     {src.get(i, '')}")
        say(f"    reference:  {ref.get(i, '')}")
        say(f"    hypothesis: {hyp[i]}")
    say(f"exact matches: {exact}/{len(ids)} ({100 * exact / max(1, len(ids)):.1f}%)")
    wrong = [i for i in ids[N_EXAMPLES:] if hyp[i].strip() != ref.get(i, "").strip()]
    if wrong and exact:
        say(f"some of the {len(ids) - exact} wrong ones:")
        for i in wrong[:3]:
            say(f"  x source:     {src.get(i, '')}")
            say(f"    reference:  {ref.get(i, '')}")
            say(f"    hypothesis: {hyp[i]}")
    if bleu:
        say(bleu.strip())
    say(f"(decoding took {fmt_seconds(time.time() - start)}; full output: {gen_log})")


# ----------------------------------------------------------------------------- main


def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(
        description="GradInit demo: prepare data, fairseq-train --gradinit, translate.",
        epilog="Arguments after '--' are passed to fairseq-train unchanged.")
    parser.add_argument("--data", type=Path,
                        help="raw parallel text: train/valid(or val)/test.{SRC,TGT}; "
                             "default: generate the German->English number-words corpus")
    parser.add_argument("--src", default="de", help="source language suffix (default: de)")
    parser.add_argument("--tgt", default="en", help="target language suffix (default: en)")
    parser.add_argument("--workdir", type=Path, default=REPO / "demo-work",
                        help="work directory (default: demo-work/ at the repository root)")
    parser.add_argument("--vocab-size", type=int,
                        help=f"sentencepiece vocabulary (default: {DEMO_VOCAB} for the demo "
                             f"corpus, {USER_VOCAB} with --data)")
    parser.add_argument("--max-update", type=int, default=DEFAULT_MAX_UPDATE,
                        help=f"training updates (default: {DEFAULT_MAX_UPDATE})")
    parser.add_argument("--gradinit-iters", type=int, default=DEFAULT_GRADINIT_ITERS,
                        help=f"GradInit iterations (default: {DEFAULT_GRADINIT_ITERS})")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    parser.add_argument("--seed", type=int, default=1, help="training seed (default: 1)")
    parser.add_argument("--no-gradinit", action="store_true",
                        help="train the same model without GradInit, for comparison")
    args = parser.parse_args(argv)
    if args.max_update < 1 or args.gradinit_iters < 1:
        parser.error("--max-update and --gradinit-iters must be >= 1")
    if args.src == args.tgt:
        parser.error("--src and --tgt must differ")
    return args, extra


def main(argv=None) -> int:
    args, extra = parse_args(argv)
    t0 = time.time()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.data is None:
            if (args.src, args.tgt) != ("de", "en"):
                raise DemoError("the built-in corpus is de->en; use --src/--tgt with --data only")
            raw = demo_corpus(workdir)
            prep = workdir / "prep-number-words"
            vocab = args.vocab_size or DEMO_VOCAB
        else:
            raw = args.data.resolve()
            if not raw.is_dir():
                raise DemoError(f"--data {args.data}: no such directory")
            tag = hashlib.sha1(str(raw).encode()).hexdigest()[:8]
            prep = workdir / f"prep-{raw.name}-{args.src}-{args.tgt}-{tag}"
            vocab = args.vocab_size or USER_VOCAB
            say(f"corpus: {raw} ({args.src} -> {args.tgt})")
        data_bin = prepare_data(raw, prep, args.src, args.tgt, vocab)

        label = "baseline" if args.no_gradinit else "gradinit"
        save_dir = fresh_run_dir(workdir, label)
        log_path = save_dir / "train.log"
        cmd = train_command(data_bin, save_dir, args, extra)
        say(f"train:  Post-LN Transformer 3+3 layers, 128 wide, 4 heads, FFN 256; adam lr "
            f"{args.lr:g}, no warmup, linear decay over {args.max_update} updates; "
            + ("no GradInit" if args.no_gradinit else f"GradInit {args.gradinit_iters} iterations"))
        say(f"        full log: {log_path}")
        monitor = TrainMonitor()
        run_logged(cmd, log_path, monitor)
        train_seconds = time.time() - monitor.start
        say(f"        training finished in {fmt_seconds(train_seconds)}"
            + (f" (GradInit {fmt_seconds(monitor.gradinit_end - monitor.start)} of it, "
               "incl. start-up)" if monitor.gradinit_end else ""))
        say()
        if not args.no_gradinit:
            gradinit_summary(save_dir)
            say()
        curve_summary(monitor.curve)
        say()
        translate(data_bin, save_dir, args)
    except DemoError as e:
        say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    say()
    say(f"demo finished in {fmt_seconds(time.time() - t0)}; outputs in {save_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
