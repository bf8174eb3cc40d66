"""The benchmarks' default data: Multi30k De-En from ../shared/data, binarized once.

It goes through the project's own pipeline (examples/prepare_data.py: a joined 8k
sentencepiece vocabulary, then fairseq-preprocess with a joined dictionary) into
bench/work/multi30k/, and is reused from there.
"""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT.parent / "shared" / "data" / "multi30k"


def prepare_multi30k(vocab_size: int = 8000) -> Path:
    data_bin = ROOT / "bench" / "work" / "multi30k" / "data-bin"
    if not (data_bin / "train.de-en.de.bin").exists():
        spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "examples" / "prepare_data.py")
        prepare_data = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(prepare_data)
        prepare_data.prepare(RAW, data_bin.parent, "de", "en", vocab_size, workers=2)
    return data_bin
