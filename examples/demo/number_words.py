#!/usr/bin/env python3
"""Offline demo corpus: German number words -> English number words.

    312  -> "dreihundertzwölf"           / "three hundred twelve"
    2312 -> "zweitausenddreihundertzwölf" / "two thousand three hundred twelve"

The task needs no download, is exactly checkable, and still asks a translation model
for something real: German writes units before tens ("einundzwanzig" = one-and-twenty)
and glues everything into one compound word, English does neither.

Usage:
    python examples/demo/number_words.py OUT_DIR [--train N --valid N --test N
                                             --seed S --max-number N]

writes OUT_DIR/{train,valid,test}.{de,en}, one sentence per line, line-aligned.
"""

import argparse
import random
from pathlib import Path

MAX_SUPPORTED = 999_999

# Defaults sized for a demo that trains in a few minutes on 2 CPU cores: 20000 lines of
# ~5-15 tokens are ~0.2M target tokens per epoch, a few epochs fit in minutes and are
# enough for a small Transformer to learn the reordering. 500 valid/test lines keep
# validation and BLEU cheap yet not too noisy.
DEFAULT_TRAIN = 20_000
DEFAULT_VALID = 500
DEFAULT_TEST = 500
# Up to six digits exercises "tausend" compounds; draw_number() keeps most numbers
# below 10000 so that sentences stay short.
DEFAULT_MAX_NUMBER = MAX_SUPPORTED
# Probability that a line holds two numbers joined by "und"/"and" instead of one.
PAIR_PROBABILITY = 0.5

_DE_ONES = ["null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun",
            "zehn", "elf", "zwölf", "dreizehn", "vierzehn", "fünfzehn", "sechzehn",
            "siebzehn", "achtzehn", "neunzehn"]
_DE_TENS = ["", "", "zwanzig", "dreißig", "vierzig", "fünfzig", "sechzig", "siebzig",
            "achtzig", "neunzig"]
_EN_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
            "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
            "seventeen", "eighteen", "nineteen"]
_EN_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty",
            "ninety"]


def _check_range(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_SUPPORTED:
        raise ValueError(f"expected an int in 0..{MAX_SUPPORTED}, got {n!r}")


def _german_below_1000(n: int, final: bool) -> str:
    """German for 1 <= n <= 999; `final` says whether the word ends here.

    A trailing 1 is "eins" only at the very end of the number ("einhunderteins");
    before "tausend" it is "ein" ("einhunderteintausend"). Inside, one is always "ein"
    ("einundzwanzig", "einhundert").
    """
    hundreds, rest = divmod(n, 100)
    word = ""
    if hundreds:
        # Always "einhundert", never bare "hundert", so the corpus is consistent.
        word = ("ein" if hundreds == 1 else _DE_ONES[hundreds]) + "hundert"
    if rest == 1:
        word += "eins" if final else "ein"
    elif 0 < rest < 20:
        word += _DE_ONES[rest]
    elif rest >= 20:
        tens, ones = divmod(rest, 10)
        if ones:
            word += ("ein" if ones == 1 else _DE_ONES[ones]) + "und"
        word += _DE_TENS[tens]
    return word


def german(n: int) -> str:
    """Spell 0 <= n <= 999999 as one lower-case German word, e.g. 21 -> "einundzwanzig".

    Uses "einhundert"/"eintausend" (never bare "hundert"/"tausend") throughout.
    """
    _check_range(n)
    if n == 0:
        return "null"
    thousands, rest = divmod(n, 1000)
    word = ""
    if thousands:
        word = _german_below_1000(thousands, final=False) + "tausend"
    if rest:
        word += _german_below_1000(rest, final=True)
    return word


def _english_below_1000(n: int) -> list:
    hundreds, rest = divmod(n, 100)
    words = []
    if hundreds:
        words += [_EN_ONES[hundreds], "hundred"]
    if 0 < rest < 20:
        words.append(_EN_ONES[rest])
    elif rest >= 20:
        tens, ones = divmod(rest, 10)
        words.append(_EN_TENS[tens])
        if ones:
            words.append(_EN_ONES[ones])
    return words


def english(n: int) -> str:
    """Spell 0 <= n <= 999999 in English words, space separated, without hyphens or "and".

    E.g. 2312 -> "two thousand three hundred twelve", 21 -> "twenty one".
    """
    _check_range(n)
    if n == 0:
        return "zero"
    thousands, rest = divmod(n, 1000)
    words = []
    if thousands:
        words += _english_below_1000(thousands) + ["thousand"]
    words += _english_below_1000(rest)
    return " ".join(words)


def draw_number(rng: random.Random, max_number: int) -> int:
    """Draw a number in 0..max_number, about equally often from each order of magnitude.

    Uniform over 0..999999 would make 90% of numbers six digits long; picking the upper
    bound first (100, 1000, 10000 or max_number+1) gives short and long examples alike
    and keeps three quarters of the numbers below 10000 with the default max_number.
    """
    bounds = sorted({min(b, max_number + 1) for b in (100, 1_000, 10_000, max_number + 1)})
    return rng.randrange(rng.choice(bounds))


def _draw_line(rng: random.Random, max_number: int) -> tuple:
    numbers = [draw_number(rng, max_number)]
    if rng.random() < PAIR_PROBABILITY:
        numbers.append(draw_number(rng, max_number))
    return (" und ".join(german(n) for n in numbers),
            " and ".join(english(n) for n in numbers))


def write_corpus(out_dir, n_train: int = DEFAULT_TRAIN, n_valid: int = DEFAULT_VALID,
                 n_test: int = DEFAULT_TEST, seed: int = 0,
                 max_number: int = DEFAULT_MAX_NUMBER) -> Path:
    """Write out_dir/{train,valid,test}.{de,en} and return out_dir as a Path.

    Every line (one number, or two joined by "und"/"and") occurs at most once in the whole
    corpus, so no test or valid sentence is seen in training. The same arguments always
    give byte-identical files. A split with 0 lines is not written. Raises ValueError when
    max_number is too small to give that many distinct lines.
    """
    _check_range(max_number)
    counts = {"train": n_train, "valid": n_valid, "test": n_test}
    if any(c < 0 for c in counts.values()):
        raise ValueError(f"line counts must be >= 0, got {counts}")
    total = sum(counts.values())
    rng = random.Random(seed)

    # Rejection sampling: small numbers repeat often, so cap the attempts to fail
    # clearly instead of looping forever when max_number allows too few distinct lines.
    seen, lines = set(), []
    attempts = 0
    while len(lines) < total:
        attempts += 1
        if attempts > 100 * total + 10_000:
            raise ValueError(f"found only {len(lines)} distinct lines of the {total} asked "
                             f"for; raise max_number ({max_number}) or ask for fewer lines")
        pair = _draw_line(rng, max_number)
        if pair[0] not in seen:
            seen.add(pair[0])
            lines.append(pair)
    # Shuffle before slicing so that the splits have the same distribution (the first
    # draws would otherwise be the ones that grab the few one-digit numbers).
    rng.shuffle(lines)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, count in counts.items():
        chunk = lines[start:start + count]
        start += count
        if not count:
            continue
        for lang, column in (("de", 0), ("en", 1)):
            with open(out_dir / f"{split}.{lang}", "w", encoding="utf-8", newline="\n") as f:
                f.writelines(pair[column] + "\n" for pair in chunk)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory for {train,valid,test}.{de,en}")
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN, help="training lines")
    parser.add_argument("--valid", type=int, default=DEFAULT_VALID, help="validation lines")
    parser.add_argument("--test", type=int, default=DEFAULT_TEST, help="test lines")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--max-number", type=int, default=DEFAULT_MAX_NUMBER,
                        help=f"largest number to draw (at most {MAX_SUPPORTED})")
    args = parser.parse_args(argv)
    try:
        out = write_corpus(args.out_dir, args.train, args.valid, args.test, args.seed,
                           args.max_number)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {args.train}/{args.valid}/{args.test} train/valid/test lines to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
