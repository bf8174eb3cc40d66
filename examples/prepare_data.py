#!/usr/bin/env python3
"""Turn a directory of raw parallel text into fairseq binarized data.

    python examples/prepare_data.py RAW_DIR DEST_DIR --src de --tgt en \
        [--vocab-size 8000] [--workers 2]

RAW_DIR must hold train.{src,tgt} and valid.{src,tgt} (or val.{src,tgt}, as in
Multi30k), and may hold test.{src,tgt}: plain UTF-8 text, one sentence per line,
line-aligned. The steps are:

  1. check that the files exist and aligned files have the same, non-zero line count;
  2. train one joined sentencepiece BPE model on train.src + train.tgt
     -> DEST_DIR/spm.model, DEST_DIR/spm.vocab;
  3. encode every split into pieces -> DEST_DIR/spm/{train,valid,test}.{src,tgt};
  4. run fairseq-preprocess with a joined dictionary -> DEST_DIR/data-bin.

Running it again overwrites DEST_DIR's outputs. Bad input exits with code 2 and a
one-line message.
"""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import sentencepiece as spm

# Accepted file stems per split, first found wins; the output is always named "valid"
# because that is the split name fairseq-train looks for.
SPLIT_STEMS = {"train": ("train",), "valid": ("valid", "val"), "test": ("test",)}
REQUIRED_SPLITS = ("train", "valid")


class DataError(Exception):
    """Raw data or a preparation step is unusable; the message names what and why."""


def _count_lines(path: Path) -> int:
    # Count lines the way fairseq and the encoder below read them (text mode, universal
    # newlines), so that "equal counts" here means aligned binarized datasets there.
    try:
        with open(path, encoding="utf-8") as f:
            return sum(1 for _ in f)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def check_aligned(pair, missing_hint: str = "") -> int:
    """The common line count of two aligned files; DataError naming the file otherwise."""
    for path in pair:
        if not Path(path).is_file():
            raise DataError(f"missing {path}{missing_hint}")
    n_src, n_tgt = _count_lines(pair[0]), _count_lines(pair[1])
    if n_src != n_tgt:
        raise DataError(f"{pair[0]} has {n_src} lines but {pair[1]} has {n_tgt}; "
                        "aligned files need equal line counts")
    if n_src == 0:
        raise DataError(f"{pair[0]} and {pair[1]} are empty")
    return n_src


def find_splits(raw_dir, src: str, tgt: str) -> dict:
    """Check RAW_DIR's files and return {split: (src_path, tgt_path)} for the splits found.

    Raises DataError naming the file when a required file is missing, or when a pair of
    aligned files is empty or has different line counts.
    """
    raw_dir = Path(raw_dir)
    if src == tgt:
        raise DataError(f"--src and --tgt must differ, both are {src!r}")
    if not raw_dir.is_dir():
        raise DataError(f"raw data directory {raw_dir} does not exist")
    splits = {}
    for split, stems in SPLIT_STEMS.items():
        stem = next((s for s in stems if (raw_dir / f"{s}.{src}").exists()
                     or (raw_dir / f"{s}.{tgt}").exists()), None)
        if stem is None:
            if split in REQUIRED_SPLITS:
                names = " or ".join(str(raw_dir / f"{s}.{src}") for s in stems)
                raise DataError(f"missing {names}")
            continue
        pair = (raw_dir / f"{stem}.{src}", raw_dir / f"{stem}.{tgt}")
        check_aligned(pair)
        splits[split] = pair
    return splits


def train_spm(train_files, model_prefix: Path, vocab_size: int) -> Path:
    """Train one BPE sentencepiece model on all train_files; return the .model path.

    If the corpus cannot fill vocab_size pieces, the model gets as many as it can and a
    note is printed (rather than sentencepiece's hard error).
    """
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(str(f) for f in train_files),
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            model_type="bpe",
            # Keep every character of these (European-language) corpora rather than
            # mapping rare ones such as "ß" to <unk>.
            character_coverage=1.0,
            # Soft limit: small corpora (the demo, tests) may not have enough merges.
            hard_vocab_limit=False,
            # Bound memory on large user corpora; a 2M-sentence sample is plenty.
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            # Errors only: sentencepiece logs hundreds of lines per run. (Its logstream=
            # option needs a real sys.stderr file descriptor, which pytest/IPython lack.)
            minloglevel=2,
        )
    except RuntimeError as e:
        # e.g. "Vocabulary size is smaller than required_chars. 10 vs 28. ..."
        message = str(e).split("] ")[-1]
        raise DataError(f"sentencepiece training failed: {message}") from None
    model = model_prefix.with_suffix(".model")
    got = spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()
    if got < vocab_size:
        print(f"note: the training data only supports {got} sentencepiece pieces, "
              f"not the {vocab_size} asked for; using {got}")
    return model


def encode_file(sp: spm.SentencePieceProcessor, src_path: Path, out_path: Path) -> None:
    """Write src_path's lines to out_path as space-separated sentencepiece pieces."""
    with open(src_path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    with open(out_path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(" ".join(pieces) + "\n" for pieces in sp.encode(lines, out_type=str))


def binarize(spm_dir: Path, data_bin: Path, src: str, tgt: str, splits, workers: int) -> None:
    """Run fairseq_cli.preprocess on spm_dir/{split}.{lang} into data_bin."""
    # fairseq-preprocess refuses to overwrite an existing dictionary, so start afresh.
    shutil.rmtree(data_bin, ignore_errors=True)
    cmd = [sys.executable, "-m", "fairseq_cli.preprocess",
           "--source-lang", src, "--target-lang", tgt,
           "--destdir", str(data_bin), "--joined-dictionary", "--workers", str(workers)]
    for split in splits:
        cmd += [f"--{split}pref", str(spm_dir / split)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-20:])
        raise DataError(f"fairseq preprocess failed with exit code {result.returncode}:\n"
                        f"{tail}")


def prepare(raw_dir, dest_dir, src: str, tgt: str, vocab_size: int, workers: int = 1) -> Path:
    """Check, sentencepiece-encode and binarize RAW_DIR; return DEST_DIR/data-bin.

    Raises DataError (with a one-line message for bad input) on any failure.
    """
    splits = find_splits(raw_dir, src, tgt)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)

    model = train_spm(splits["train"], dest_dir / "spm", vocab_size)
    sp = spm.SentencePieceProcessor(model_file=str(model))

    spm_dir = dest_dir / "spm"
    # Drop leftovers (e.g. a test split from an earlier run) so fairseq sees only these.
    shutil.rmtree(spm_dir, ignore_errors=True)
    spm_dir.mkdir()
    for split, pair in splits.items():
        for lang, path in zip((src, tgt), pair):
            encode_file(sp, path, spm_dir / f"{split}.{lang}")

    data_bin = dest_dir / "data-bin"
    binarize(spm_dir, data_bin, src, tgt, splits, workers)
    return data_bin


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Sentencepiece-encode and binarize parallel text for fairseq.")
    parser.add_argument("raw_dir", help="directory with train/valid(val)/test.{src,tgt}")
    parser.add_argument("dest_dir", help="output directory (spm.model, spm/, data-bin/)")
    parser.add_argument("--src", required=True, help="source language suffix, e.g. de")
    parser.add_argument("--tgt", required=True, help="target language suffix, e.g. en")
    parser.add_argument("--vocab-size", type=int, default=8000,
                        help="joined sentencepiece vocabulary size (default: 8000)")
    parser.add_argument("--workers", type=int, default=1,
                        help="fairseq-preprocess worker processes (default: 1)")
    args = parser.parse_args(argv)
    try:
        data_bin = prepare(args.raw_dir, args.dest_dir, args.src, args.tgt,
                           args.vocab_size, args.workers)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"binarized data in {data_bin}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
