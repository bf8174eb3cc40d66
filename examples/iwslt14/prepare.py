#!/usr/bin/env python3
"""Prepare IWSLT'14 German-English for fairseq, the way the GradInit paper's Table 2 used it.

    # 1. download (needs internet, git and perl), as fairseq's prepare-iwslt14.sh does:
    python examples/iwslt14/prepare.py DEST
    # 2. from a local copy of the raw archive (de-en.tgz; needs perl + Moses scripts):
    python examples/iwslt14/prepare.py DEST --raw-archive de-en.tgz [--moses DIR]
    # 3. from already-tokenized text DIR/{train,valid,test}.{de,en} (no internet, no Moses):
    python examples/iwslt14/prepare.py DEST --tokenized DIR
    # your own (tokenized) data, any line counts, other languages:
    python examples/iwslt14/prepare.py DEST --tokenized DIR --any-counts [--src xx --tgt yy]

Steps (1 and 2 reproduce fairseq's examples/translation/prepare-iwslt14.sh): drop the
<url>/<talkid>/<keywords> lines of train.tags.de-en.*, strip <title>/<description>,
Moses-tokenize, clean-corpus-n (ratio 1.5, length 1..175), lowercase; dev/test XML: take
the <seg> lines, same tokenization + lowercasing; every 23rd training line goes to valid;
test = dev2010 + dev2012 + tst2010 + tst2011 + tst2012. The tokenized text lands in
DEST/tok/{train,valid,test}.{de,en} and its line counts are checked: 160,239 / 7,283 /
6,750 pairs (--any-counts accepts other counts). Then a joined sentencepiece BPE model
(--vocab-size, default 10000, the paper's joined BPE size) is trained on train and all
splits are binarized with fairseq-preprocess --joined-dictionary (examples/prepare_data.py)
into DEST/data-bin, the DATA_BIN of train.sh / evaluate.py.

Bad input exits with code 2 and a one-line "error: ..." message.
"""

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VENV_PY = REPO / ".venv" / "bin" / "python"
# Use the repository's virtual environment when there is one (and we are not in it).
if __name__ == "__main__" and VENV_PY.exists() and Path(sys.prefix).resolve() != VENV_PY.parents[1].resolve():
    os.execv(str(VENV_PY), [str(VENV_PY), *sys.argv])

# The URL fairseq's examples/translation/prepare-iwslt14.sh downloads.
URL = "http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"
MOSES_GIT = "https://github.com/moses-smt/mosesdecoder.git"
EXPECTED = {"train": 160_239, "valid": 7_283, "test": 6_750}
SPLITS = ("train", "valid", "test")
TEST_SETS = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
             "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare_data = _load("_iwslt14_prepare_data", REPO / "examples" / "prepare_data.py")
DataError = prepare_data.DataError


def check_tokenized(tok_dir, src: str, tgt: str, any_counts: bool) -> dict:
    """Check DIR/{train,valid,test}.{src,tgt}: present, aligned, expected counts.

    Returns {split: n_lines}; raises DataError with a message naming the problem.
    """
    tok_dir = Path(tok_dir)
    if not tok_dir.is_dir():
        raise DataError(f"tokenized data directory {tok_dir} does not exist")
    counts = {}
    for split in SPLITS:
        pair = [tok_dir / f"{split}.{lang}" for lang in (src, tgt)]
        need = f" (need {', '.join(f'{s}.{src}/{s}.{tgt}' for s in SPLITS)})"
        counts[split] = prepare_data.check_aligned(pair, missing_hint=need)
    if not any_counts:
        wrong = [f"{s} has {counts[s]:,} pairs, expected {EXPECTED[s]:,}"
                 for s in SPLITS if counts[s] != EXPECTED[s]]
        if wrong:
            raise DataError(
                f"{tok_dir} is not the standard IWSLT'14 {src}-{tgt} split: " + "; ".join(wrong)
                + " (pass --any-counts to use other data)")
    return counts


# ------------------------------------------------------------------ raw archive -> tokens


def find_moses(moses) -> Path:
    """The mosesdecoder checkout: --moses, $MOSES, or examples/iwslt14/mosesdecoder (cloned
    with git there if missing, as fairseq's script does)."""
    candidates = [Path(moses)] if moses else []
    if os.environ.get("MOSES"):
        candidates.append(Path(os.environ["MOSES"]))
    default = HERE / "mosesdecoder"
    candidates.append(default)
    for c in candidates:
        if (c / "scripts" / "tokenizer" / "tokenizer.perl").is_file():
            return c
    if moses:
        raise DataError(f"--moses {moses}: no scripts/tokenizer/tokenizer.perl there")
    if shutil.which("perl") is None:
        raise DataError("tokenizing the raw archive needs perl and the Moses scripts; "
                        "install perl, or pass --tokenized with already-tokenized text")
    print(f"cloning Moses scripts into {default} ...", flush=True)
    r = subprocess.run(["git", "clone", "--depth", "1", MOSES_GIT, str(default)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise DataError(f"cannot get the Moses scripts (git clone {MOSES_GIT} failed: "
                        f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}); "
                        "pass --moses DIR with a mosesdecoder checkout, or --tokenized DIR")
    return default


def _lines(text: str):
    """Split like grep/awk do: on "\n" only (str.splitlines would also split on \r,
    \x85, \u2028, ...), keeping the newline."""
    parts = text.split("\n")
    if parts and parts[-1] == "":
        parts.pop()
    return [p + "\n" for p in parts]


def _read(path: Path) -> str:
    with open(path, encoding="utf-8", newline="") as f:  # no newline translation
        return f.read()


def _perl(script: Path, args, text: str) -> str:
    r = subprocess.run(["perl", str(script), *args], input=text, capture_output=True,
                       text=True, encoding="utf-8")
    if r.returncode != 0:
        raise DataError(f"{script.name} failed: {r.stderr.strip()[-500:]}")
    return r.stdout


def tokenize(moses: Path, lang: str, lines) -> str:
    return _perl(moses / "scripts" / "tokenizer" / "tokenizer.perl",
                 ["-threads", "8", "-l", lang, "-q"], "".join(lines))


def lowercase(moses: Path, text: str) -> str:
    return _perl(moses / "scripts" / "tokenizer" / "lowercase.perl", [], text)


def from_raw_archive(archive: Path, work: Path, moses: Path, src="de", tgt="en") -> Path:
    """prepare-iwslt14.sh on archive; returns work/tok with {train,valid,test}.{src,tgt}."""
    lang = f"{src}-{tgt}"
    orig = work / "orig"
    tmp = work / "tmp"
    tok = work / "tok"
    for d in (orig, tmp, tok):
        d.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(orig, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"cannot unpack {archive}: {e}") from None
    base = orig / lang
    if not base.is_dir():
        raise DataError(f"{archive} has no {lang}/ directory (expected the IWSLT'14 de-en.tgz)")
    for lng in (src, tgt):
        f = base / f"train.tags.{lang}.{lng}"
        if not f.is_file():
            raise DataError(f"{archive} lacks {lang}/{f.name}")
        out = []
        for line in _lines(_read(f)):
            if "<url>" in line or "<talkid>" in line or "<keywords>" in line:
                continue
            for tag in ("<title>", "</title>", "<description>", "</description>"):
                line = line.replace(tag, "")
            out.append(line)
        print(f"tokenizing train.{lng} ({len(out):,} lines) ...", flush=True)
        (tmp / f"train.tags.{lang}.tok.{lng}").write_text(tokenize(moses, lng, out), encoding="utf-8")
    r = subprocess.run(["perl", str(moses / "scripts" / "training" / "clean-corpus-n.perl"),
                        "-ratio", "1.5", str(tmp / f"train.tags.{lang}.tok"), src, tgt,
                        str(tmp / f"train.tags.{lang}.clean"), "1", "175"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise DataError(f"clean-corpus-n.perl failed: {r.stderr.strip()[-500:]}")
    for lng in (src, tgt):
        lines = _lines(lowercase(moses, _read(tmp / f"train.tags.{lang}.clean.{lng}")))
        # every 23rd line (1-based) to valid, the rest to train
        (tok / f"valid.{lng}").write_text("".join(lines[22::23]), encoding="utf-8")
        (tok / f"train.{lng}").write_text(
            "".join(l for i, l in enumerate(lines, 1) if i % 23 != 0), encoding="utf-8")
        test = []
        for name in TEST_SETS:
            xml = base / f"{name}.{lang}.{lng}.xml"
            if not xml.is_file():
                raise DataError(f"{archive} lacks {lang}/{xml.name}")
            segs = []
            for line in _lines(_read(xml)):
                line = line[:-1]
                if "<seg id" not in line:
                    continue
                line = re.sub(r'<seg id="[0-9]*">\s*', "", line)
                line = re.sub(r"\s*</seg>\s*", "", line)
                segs.append(line.replace("\u2019", "'") + "\n")
            test.append(lowercase(moses, tokenize(moses, lng, segs)))
        (tok / f"test.{lng}").write_text("".join(test), encoding="utf-8")
    return tok


def download(dest: Path) -> Path:
    target = dest / "de-en.tgz"
    if target.is_file() and target.stat().st_size > 0:
        print(f"using the already downloaded {target}")
        return target
    print(f"downloading {URL} ...", flush=True)
    part = target.with_suffix(".tgz.part")
    try:
        urllib.request.urlretrieve(URL, part)
        part.rename(target)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise DataError(f"download of {URL} failed ({e}); download it elsewhere and pass "
                        "--raw-archive FILE, or pass --tokenized DIR") from None
    return target


# ------------------------------------------------------------------ main


def prepare(dest, tokenized=None, raw_archive=None, moses=None, src="de", tgt="en",
            vocab_size=10_000, any_counts=False, workers=1) -> Path:
    """Whole pipeline; returns DEST/data-bin. Raises DataError on bad input."""
    dest = Path(dest)
    if tokenized is not None and raw_archive is not None:
        raise DataError("give either --tokenized or --raw-archive, not both")
    if tokenized is not None:
        # check before writing anything
        counts = check_tokenized(tokenized, src, tgt, any_counts)
        dest.mkdir(parents=True, exist_ok=True)
        tok = dest / "tok"
        if Path(tokenized).resolve() != tok.resolve():
            shutil.rmtree(tok, ignore_errors=True)
            tok.mkdir()
            for split in SPLITS:
                for lang in (src, tgt):
                    shutil.copyfile(Path(tokenized) / f"{split}.{lang}", tok / f"{split}.{lang}")
    else:
        if (src, tgt) != ("de", "en"):
            raise DataError("the raw-archive/download path is IWSLT'14 de-en only; "
                            "use --tokenized for other languages")
        dest.mkdir(parents=True, exist_ok=True)
        archive = Path(raw_archive) if raw_archive else download(dest)
        if not archive.is_file():
            raise DataError(f"--raw-archive {archive}: no such file")
        tok = from_raw_archive(archive, dest, find_moses(moses), src, tgt)
        counts = check_tokenized(tok, src, tgt, any_counts)
    print("tokenized pairs: " + ", ".join(f"{s} {counts[s]:,}" for s in SPLITS), flush=True)
    print(f"sentencepiece (joined BPE, vocab {vocab_size}) + fairseq-preprocess ...", flush=True)
    return prepare_data.prepare(tok, dest, src, tgt, vocab_size, workers)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dest", help="output directory (tok/, spm.model, spm/, data-bin/)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--raw-archive", help="local copy of de-en.tgz (no download)")
    g.add_argument("--tokenized", help="directory with tokenized train/valid/test.{src,tgt}")
    p.add_argument("--moses", help="mosesdecoder checkout (default: $MOSES, or clone one "
                                   "into examples/iwslt14/mosesdecoder)")
    p.add_argument("--src", default="de")
    p.add_argument("--tgt", default="en")
    p.add_argument("--vocab-size", type=int, default=10_000,
                   help="joined sentencepiece vocabulary (default: 10000)")
    p.add_argument("--any-counts", action="store_true",
                   help="accept line counts other than IWSLT'14's 160239/7283/6750")
    p.add_argument("--workers", type=int, default=1, help="fairseq-preprocess workers")
    a = p.parse_args(argv)
    try:
        data_bin = prepare(a.dest, a.tokenized, a.raw_archive, a.moses, a.src, a.tgt,
                           a.vocab_size, a.any_counts, a.workers)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"binarized data in {data_bin}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
