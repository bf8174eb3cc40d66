#!/usr/bin/env python3
"""Translate the test set of a trained run and score it; results go to SAVE_DIR/bleu.json.

    python examples/iwslt14/evaluate.py SAVE_DIR DATA_BIN [--checkpoint checkpoint_best.pt]
        [--subset test] [--cpu] [--detok moses|none] [--moses DIR] [--max-tokens 8000]
        [more fairseq-generate flags, e.g. --max-len-b 50]

1. fairseq-generate (--user-dir fairseq_gradinit, beam 5, lenpen 1,
   --required-batch-size-multiple 1 so that no sentence is dropped, sentencepiece removed,
   --scoring bleu) -> SAVE_DIR/generate-SUBSET.txt.
2. Tokenized BLEU, the number the paper reports: the hypotheses (sentencepiece removed,
   i.e. Moses-tokenized, lowercased words) against DATA_BIN/../tok/SUBSET.en (the tokenized
   references prepare.py wrote; the T- lines of the output if that file is missing), with
   sacrebleu tokenize=none; fairseq's own --scoring bleu number is stored too.
3. Detokenized BLEU (sacrebleu's default 13a tokenization, signature printed): hypotheses and
   references detokenized with Moses' detokenizer.perl (--detok moses, the default; needs
   perl and the Moses scripts: --moses DIR, $MOSES or examples/iwslt14/mosesdecoder, or the
   sacremoses package) or taken as they are (--detok none, for data that is not
   Moses-tokenized). Without a detokenizer this BLEU is left out (null) with a note.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VENV_PY = REPO / ".venv" / "bin" / "python"
if __name__ == "__main__" and VENV_PY.exists() and Path(sys.prefix).resolve() != VENV_PY.parents[1].resolve():
    os.execv(str(VENV_PY), [str(VENV_PY), *sys.argv])

import sacrebleu  # noqa: E402

BIN = Path(sys.executable).parent


class EvalError(Exception):
    pass


def tool(name):
    script = BIN / name
    return [str(script)] if script.exists() else [sys.executable, "-m", "fairseq_cli." + name.split("-", 1)[1]]


def langs(data_bin: Path, subset: str):
    found = sorted(data_bin.glob(f"{subset}.*-*.*.bin"))
    if not found:
        raise EvalError(f"{data_bin} has no {subset} split")
    pair = found[0].name.split(".")[1]
    src, tgt = pair.split("-")
    return src, tgt


def generate(save_dir: Path, data_bin: Path, checkpoint: Path, subset, src, tgt, args) -> Path:
    out = save_dir / f"generate-{subset}.txt"
    cmd = tool("fairseq-generate") + [
        str(data_bin), "--user-dir", str(REPO / "fairseq_gradinit"), "--path", str(checkpoint),
        "--source-lang", src, "--target-lang", tgt, "--gen-subset", subset,
        "--beam", "5", "--lenpen", "1", "--max-tokens", str(args.max_tokens),
        "--required-batch-size-multiple", "1", "--post-process", "sentencepiece",
        "--scoring", "bleu", "--no-progress-bar", "--seed", "1",
    ] + (["--cpu"] if args.cpu else []) + list(args.extra)
    with open(out, "w", encoding="utf-8") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if r.returncode != 0:
        raise EvalError(f"fairseq-generate failed (exit {r.returncode}):\n"
                        + "\n".join(r.stderr.strip().splitlines()[-15:]))
    return out


def parse(gen_out: Path):
    hyp, ref, fairseq_bleu = {}, {}, None
    for line in gen_out.read_text(encoding="utf-8").splitlines():
        if line.startswith("H-"):
            key, _, text = line.split("\t", 2) if line.count("\t") >= 2 else (line, "", "")
            hyp[int(key[2:])] = text
        elif line.startswith("T-"):
            key, _, text = line.partition("\t")
            ref[int(key[2:])] = text
        elif line.startswith("Generate ") and "BLEU4 = " in line:
            fairseq_bleu = float(re.search(r"BLEU4 = ([0-9.]+)", line).group(1))
    return hyp, ref, fairseq_bleu


def moses_detokenizer(moses_dir):
    """A function list[str] -> list[str], or (None, why)."""
    candidates = [Path(moses_dir)] if moses_dir else []
    if os.environ.get("MOSES"):
        candidates.append(Path(os.environ["MOSES"]))
    candidates.append(HERE / "mosesdecoder")
    for c in candidates:
        script = c / "scripts" / "tokenizer" / "detokenizer.perl"
        if script.is_file() and shutil.which("perl"):
            def detok(lines, lang, script=script):
                r = subprocess.run(["perl", str(script), "-q", "-l", lang],
                                   input="".join(l + "\n" for l in lines), capture_output=True,
                                   text=True, encoding="utf-8")
                if r.returncode != 0:
                    raise EvalError(f"detokenizer.perl failed: {r.stderr.strip()[-300:]}")
                return r.stdout.splitlines()
            return detok, None
    try:
        from sacremoses import MosesDetokenizer
    except ImportError:
        return None, ("no Moses detokenizer (no detokenizer.perl under --moses/$MOSES/"
                      "examples/iwslt14/mosesdecoder, and sacremoses is not installed)")

    def detok(lines, lang):
        md = MosesDetokenizer(lang=lang)
        return [md.detokenize(l.split()) for l in lines]
    return detok, None


def evaluate(save_dir, data_bin, checkpoint="checkpoint_best.pt", subset="test", cpu=False,
             detok="moses", moses=None, max_tokens=8000, extra=()) -> dict:
    save_dir, data_bin = Path(save_dir), Path(data_bin)
    ckpt = Path(checkpoint) if Path(checkpoint).is_absolute() else save_dir / checkpoint
    if not ckpt.is_file():
        raise EvalError(f"no checkpoint {ckpt}")
    src, tgt = langs(data_bin, subset)
    args = argparse.Namespace(cpu=cpu, max_tokens=max_tokens, extra=extra)
    print(f"translating {data_bin}/{subset} ({src}->{tgt}) with {ckpt} (beam 5) ...", flush=True)
    gen_out = generate(save_dir, data_bin, ckpt, subset, src, tgt, args)
    hyp, ref_t, fairseq_bleu = parse(gen_out)
    ids = sorted(hyp)
    ref_file = data_bin.parent / "tok" / f"{subset}.{tgt}"
    refs = None
    if ref_file.is_file():
        lines = ref_file.read_text(encoding="utf-8").splitlines()
        if len(lines) == len(ids) and ids == list(range(len(ids))):
            refs = [" ".join(l.split()) for l in lines]
            ref_source = str(ref_file)
    if refs is None:
        refs = [ref_t[i] for i in ids]
        ref_source = f"T- lines of {gen_out.name}"
    hyps = [hyp[i] for i in ids]
    tok_metric = sacrebleu.BLEU(tokenize="none")
    tok = tok_metric.corpus_score(hyps, [refs])
    result = {
        "checkpoint": str(ckpt), "subset": subset, "sentences": len(ids),
        "references": ref_source,
        "tokenized_bleu": round(tok.score, 2),
        "tokenized_signature": str(tok_metric.get_signature()),
        "fairseq_bleu": fairseq_bleu,
    }
    print(f"tokenized BLEU (paper's metric, sacrebleu tokenize=none): {tok.score:.2f}")
    print(f"fairseq-generate --scoring bleu: {fairseq_bleu}")
    if detok == "none":
        d_hyps, d_refs, how = hyps, refs, "none (text used as it is)"
    else:
        fn, why = moses_detokenizer(moses)
        if fn is None:
            d_hyps = None
            result.update(detok_bleu=None, detok_note=why)
            print(f"detokenized BLEU: skipped, {why}")
        else:
            d_hyps, d_refs, how = fn(hyps, tgt), fn(refs, tgt), "moses"
    if d_hyps is not None:
        metric = sacrebleu.BLEU()
        score = metric.corpus_score(d_hyps, [d_refs])
        sig = str(metric.get_signature())
        result.update(detok_bleu=round(score.score, 2), detok_signature=sig, detokenizer=how)
        print(f"detokenized BLEU (sacrebleu, detokenizer {how}): {score.score:.2f}")
        print(f"  signature: {sig}")
    (save_dir / "bleu.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {save_dir / 'bleu.json'}")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Beam-search the test set and write bleu.json.")
    p.add_argument("save_dir")
    p.add_argument("data_bin")
    p.add_argument("--checkpoint", default="checkpoint_best.pt",
                   help="file name in SAVE_DIR or absolute path (default: checkpoint_best.pt)")
    p.add_argument("--subset", default="test")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--detok", choices=("moses", "none"), default="moses")
    p.add_argument("--moses", help="mosesdecoder checkout for detokenizer.perl")
    p.add_argument("--max-tokens", type=int, default=8000)
    a, extra = p.parse_known_args(argv)
    try:
        evaluate(a.save_dir, a.data_bin, a.checkpoint, a.subset, a.cpu, a.detok, a.moses,
                 a.max_tokens, extra)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
