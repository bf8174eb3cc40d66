"""Shared fixtures: tiny binarized data and a runner for the stock fairseq-train."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = str(ROOT / "fairseq_gradinit")
BIN = Path(sys.executable).parent
# Raw Multi30k in shared/ beside the checkout (CI), or beside the worktrees' folder.
MULTI30K = os.environ.get("MULTI30K") or next(
    (str(p) for p in (ROOT.parent / "shared" / "data" / "multi30k", ROOT.parent.parent / "shared" / "data" / "multi30k") if p.is_dir()),
    str(ROOT.parent / "shared" / "data" / "multi30k"),
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "official: also run against the official fairseq 0.12.2 release (make test-official)",
    )


def official_fairseq() -> bool:
    """True in the environment of `make test-official`: the official fairseq 0.12.2 release."""
    from importlib import metadata

    try:
        return metadata.version("fairseq") == "0.12.2"
    except metadata.PackageNotFoundError:
        return False


def installed_user_dir():
    """Where fairseq finds `--user-dir fairseq_gradinit` from a directory without one: next
    to its own package (site-packages), if the plugin is installed there; else None."""
    import fairseq.utils

    path = os.path.join(os.path.dirname(fairseq.utils.__file__), "..", "fairseq_gradinit")
    return path if os.path.isfile(os.path.join(path, "__init__.py")) else None

# A 1+1 layer, 16-wide Post-LN transformer: the literal user command with a tiny model.
TINY_ARCH = (
    "--encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 16 --decoder-embed-dim 16 "
    "--encoder-ffn-embed-dim 32 --decoder-ffn-embed-dim 32 "
    "--encoder-attention-heads 2 --decoder-attention-heads 2"
).split()

# The README's command, verbatim but for the data directory.
USER_COMMAND = [
    "--user-dir", PLUGIN, "--gradinit",
    "--warmup-updates", "0", "--arch", "transformer_iwslt_de_en",
    "--share-decoder-input-output-embed",
    "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "5e-4",
    "--lr-scheduler", "polynomial_decay", "--power", "1", "--total-num-update", "100000",
    "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
    "--max-tokens", "4096",
]  # fmt: skip


def load_script(name, relative_path):
    spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def data_bin(tmp_path_factory):
    """400 pairs of the demo corpus, binarized with a joined 100-piece vocabulary."""
    work = tmp_path_factory.mktemp("data")
    numbers = load_script("demo_number_words", "examples/demo/number_words.py")
    prepare = load_script("prepare_data", "examples/prepare_data.py")
    numbers.write_corpus(work / "raw", n_train=400, n_valid=40, n_test=40, seed=0)
    return str(prepare.prepare(work / "raw", work / "prep", "de", "en", 100))


def fairseq(tool, *args, cwd=None, env=None):
    """Run a stock fairseq entry point of this environment; returns CompletedProcess."""
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run(
        [str(BIN / tool), *map(str, args)],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600,
    )


def train(data_bin, save_dir, *extra, tiny=True):
    """fairseq-train with the user's command, a tiny model and a short run."""
    args = [data_bin, *USER_COMMAND, *(TINY_ARCH if tiny else []), "--save-dir", save_dir,
            "--cpu", "--no-progress-bar", "--log-format", "simple", "--log-interval", "1",
            "--max-update", "4", "--gradinit-iters", "6", "--seed", "7", *extra]  # fmt: skip
    return fairseq("fairseq-train", *args)


def read_json(path):
    with open(path) as f:
        return json.load(f)
