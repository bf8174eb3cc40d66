"""Tests for the demo corpus generator (examples/demo/number_words.py) and the generic
data preparation script (examples/prepare_data.py)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBERS_PY = ROOT / "examples" / "demo" / "number_words.py"
PREPARE_PY = ROOT / "examples" / "prepare_data.py"


def _load(name, path):
    # examples/ is not a package; a private module name also keeps the demo script from
    # shadowing the standard library's `numbers` module.
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


numbers = _load("demo_numbers", NUMBERS_PY)
prepare_data = _load("prepare_data", PREPARE_PY)

# Hand-checked against German and English spelling rules.
SPELLINGS = [
    (0, "null", "zero"),
    (1, "eins", "one"),
    (7, "sieben", "seven"),
    (11, "elf", "eleven"),
    (12, "zwölf", "twelve"),
    (16, "sechzehn", "sixteen"),
    (17, "siebzehn", "seventeen"),
    (20, "zwanzig", "twenty"),
    (21, "einundzwanzig", "twenty one"),
    (30, "dreißig", "thirty"),
    (31, "einunddreißig", "thirty one"),
    (99, "neunundneunzig", "ninety nine"),
    (100, "einhundert", "one hundred"),
    (101, "einhunderteins", "one hundred one"),
    (111, "einhundertelf", "one hundred eleven"),
    (200, "zweihundert", "two hundred"),
    (312, "dreihundertzwölf", "three hundred twelve"),
    (999, "neunhundertneunundneunzig", "nine hundred ninety nine"),
    (1000, "eintausend", "one thousand"),
    (1001, "eintausendeins", "one thousand one"),
    (2312, "zweitausenddreihundertzwölf", "two thousand three hundred twelve"),
    (10000, "zehntausend", "ten thousand"),
    (21000, "einundzwanzigtausend", "twenty one thousand"),
    (100000, "einhunderttausend", "one hundred thousand"),
    (101001, "einhunderteintausendeins", "one hundred one thousand one"),
    (999999, "neunhundertneunundneunzigtausendneunhundertneunundneunzig",
     "nine hundred ninety nine thousand nine hundred ninety nine"),
]


@pytest.mark.parametrize("n, de, en", SPELLINGS)
def test_numbers_are_spelled_correctly_in_german_and_english(n, de, en):
    assert numbers.german(n) == de
    assert numbers.english(n) == en


def test_spellings_are_distinct_lower_case_and_without_hyphens():
    seen_de, seen_en = set(), set()
    for n in range(0, 1_000_000, 7):
        de, en = numbers.german(n), numbers.english(n)
        assert de == de.lower() and " " not in de
        assert "-" not in en and " and " not in f" {en} "
        seen_de.add(de)
        seen_en.add(en)
    assert len(seen_de) == len(seen_en) == len(range(0, 1_000_000, 7))


@pytest.mark.parametrize("bad", [-1, 1_000_000, 2.0])
def test_numbers_outside_the_supported_range_are_rejected(bad):
    with pytest.raises(ValueError):
        numbers.german(bad)
    with pytest.raises(ValueError):
        numbers.english(bad)


def _read(path):
    return path.read_text(encoding="utf-8").splitlines()


def test_same_seed_writes_identical_files_and_another_seed_differs(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        numbers.write_corpus(tmp_path / name, n_train=200, n_valid=20, n_test=20, seed=seed)
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            file = f"{split}.{lang}"
            assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert (tmp_path / "a" / "train.de").read_bytes() != (tmp_path / "c" / "train.de").read_bytes()


def test_corpus_lines_are_aligned_unique_and_splits_disjoint(tmp_path):
    counts = {"train": 2000, "valid": 100, "test": 100}
    numbers.write_corpus(tmp_path, n_train=2000, n_valid=100, n_test=100, seed=0)
    all_de = []
    for split, count in counts.items():
        de, en = _read(tmp_path / f"{split}.de"), _read(tmp_path / f"{split}.en")
        assert len(de) == len(en) == count
        all_de += de
        # "und" joins exactly where "and" does, so the two sides describe the same numbers.
        for d, e in zip(de, en):
            assert d.count(" und ") == e.count(" and ")
    assert len(set(all_de)) == len(all_de)


def test_corpus_mixes_single_numbers_and_pairs(tmp_path):
    numbers.write_corpus(tmp_path, n_train=1000, n_valid=10, n_test=10, seed=0)
    pairs = sum(" und " in line for line in _read(tmp_path / "train.de"))
    assert 350 < pairs < 650


def test_corpus_generator_fails_clearly_when_too_few_distinct_lines_exist(tmp_path):
    # Numbers 0..3 allow 4 single lines and 16 pairs: 20 lines at most.
    with pytest.raises(ValueError, match="distinct lines"):
        numbers.write_corpus(tmp_path, n_train=30, n_valid=0, n_test=0, max_number=3)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    return numbers.write_corpus(tmp_path_factory.mktemp("raw"), n_train=300, n_valid=30,
                                n_test=30, seed=0)


def test_prepare_writes_binarized_data_with_a_joined_dictionary(tiny_corpus, tmp_path):
    data_bin = prepare_data.prepare(tiny_corpus, tmp_path, "de", "en", vocab_size=100)
    assert data_bin == tmp_path / "data-bin"
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            assert (data_bin / f"{split}.de-en.{lang}.bin").stat().st_size > 0
            assert (data_bin / f"{split}.de-en.{lang}.idx").is_file()
    assert (data_bin / "dict.de.txt").read_text() == (data_bin / "dict.en.txt").read_text()
    assert (tmp_path / "spm.model").is_file() and (tmp_path / "spm.vocab").is_file()
    encoded = _read(tmp_path / "spm" / "train.de")
    assert len(encoded) == 300 and all("▁" in line for line in encoded)


def test_prepare_accepts_val_as_valid_and_can_run_twice(tiny_corpus, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, stem in (("train", "train"), ("valid", "val")):
        for lang in ("de", "en"):
            (raw / f"{stem}.{lang}").write_bytes((tiny_corpus / f"{split}.{lang}").read_bytes())
    for _ in range(2):
        data_bin = prepare_data.prepare(raw, tmp_path / "out", "de", "en", vocab_size=100)
    assert (data_bin / "valid.de-en.en.bin").is_file()
    assert not (data_bin / "test.de-en.en.bin").exists()


def test_too_large_vocab_size_is_reduced_with_a_note(tiny_corpus, tmp_path, capsys):
    prepare_data.train_spm([tiny_corpus / "train.de", tiny_corpus / "train.en"],
                           tmp_path / "spm", vocab_size=100_000)
    assert "note: the training data only supports" in capsys.readouterr().out


def _run_cli(*args):
    return subprocess.run([sys.executable, str(PREPARE_PY), *map(str, args)],
                          capture_output=True, text=True)


def _copy_corpus(src, dst, splits=("train", "valid")):
    dst.mkdir()
    for split in splits:
        for lang in ("de", "en"):
            (dst / f"{split}.{lang}").write_bytes((src / f"{split}.{lang}").read_bytes())


def test_cli_exits_with_code_2_naming_a_missing_file(tiny_corpus, tmp_path):
    raw = tmp_path / "raw"
    _copy_corpus(tiny_corpus, raw)
    (raw / "train.en").unlink()
    result = _run_cli(raw, tmp_path / "out", "--src", "de", "--tgt", "en")
    assert result.returncode == 2
    assert "train.en" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_exits_with_code_2_when_no_valid_split_exists(tiny_corpus, tmp_path):
    raw = tmp_path / "raw"
    _copy_corpus(tiny_corpus, raw, splits=("train",))
    result = _run_cli(raw, tmp_path / "out", "--src", "de", "--tgt", "en")
    assert result.returncode == 2
    assert "valid.de" in result.stderr and "val.de" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_exits_with_code_2_naming_files_with_mismatched_line_counts(tiny_corpus, tmp_path):
    raw = tmp_path / "raw"
    _copy_corpus(tiny_corpus, raw)
    lines = _read(raw / "valid.en")
    (raw / "valid.en").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    result = _run_cli(raw, tmp_path / "out", "--src", "de", "--tgt", "en")
    assert result.returncode == 2
    assert "valid.de" in result.stderr and "valid.en" in result.stderr
    assert "30" in result.stderr and "29" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_exits_with_code_2_on_empty_files(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("train.de", "train.en", "valid.de", "valid.en"):
        (raw / name).write_text("", encoding="utf-8")
    result = _run_cli(raw, tmp_path / "out", "--src", "de", "--tgt", "en")
    assert result.returncode == 2
    assert "train.de" in result.stderr and "empty" in result.stderr


def test_demo_generator_cli_writes_the_requested_split_sizes(tmp_path):
    result = subprocess.run([sys.executable, str(NUMBERS_PY), str(tmp_path), "--train", "50",
                             "--valid", "5", "--test", "5", "--seed", "3"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(_read(tmp_path / "train.de")) == 50
    assert len(_read(tmp_path / "test.en")) == 5
