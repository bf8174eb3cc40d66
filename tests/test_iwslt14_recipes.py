"""examples/iwslt14/: prepare -> train.sh -> evaluate.py -> collect.py (-> sweep.py) on a
tiny local corpus given as "already tokenized" text, and prepare.py's refusals."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_ARCH, load_script

HERE = ROOT / "examples" / "iwslt14"
PY = sys.executable


def run(*cmd, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    raw = tmp_path_factory.mktemp("iwslt14") / "tok-input"
    numbers = load_script("demo_number_words", "examples/demo/number_words.py")
    numbers.write_corpus(raw, n_train=300, n_valid=30, n_test=30, seed=0)
    return raw


@pytest.fixture(scope="module")
def prepared(tokenized):
    dest = tokenized.parent / "prep"
    r = run(PY, HERE / "prepare.py", dest, "--tokenized", tokenized, "--any-counts",
            "--vocab-size", "100")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "train 300, valid 30, test 30" in r.stdout
    data_bin = dest / "data-bin"
    assert (data_bin / "dict.en.txt").is_file() and (data_bin / "test.de-en.en.bin").is_file()
    assert (dest / "tok" / "test.en").read_text() == (tokenized / "test.en").read_text()
    return data_bin


def test_prepare_refuses_nonstandard_counts(tokenized, tmp_path):
    r = run(PY, HERE / "prepare.py", tmp_path / "out", "--tokenized", tokenized)
    assert r.returncode == 2
    assert "not the standard IWSLT'14 de-en split" in r.stderr
    assert "train has 300 pairs, expected 160,239" in r.stderr
    assert "--any-counts" in r.stderr
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_prepare_refuses_misaligned_and_missing(tokenized, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tokenized, bad)
    lines = (bad / "valid.en").read_text().splitlines(keepends=True)
    (bad / "valid.en").write_text("".join(lines[:-1]))
    r = run(PY, HERE / "prepare.py", tmp_path / "out", "--tokenized", bad, "--any-counts")
    assert r.returncode == 2
    assert "valid.de has 30 lines but" in r.stderr and "valid.en has 29" in r.stderr
    (bad / "valid.en").write_text("".join(lines))
    (bad / "test.de").unlink()
    r = run(PY, HERE / "prepare.py", tmp_path / "out", "--tokenized", bad, "--any-counts")
    assert r.returncode == 2 and "missing" in r.stderr and "test.de" in r.stderr


def test_pipeline_train_evaluate_collect(prepared, tmp_path):
    save = tmp_path / "runs" / "gradinit-adam-s1"
    r = run("bash", HERE / "train.sh", "gradinit-adam", prepared, save, "--small", "--cpu",
            "--max-update", "3", "--seed", "1", "--gradinit-iters", "3", *TINY_ARCH)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "GradInit done" in r.stdout
    assert json.loads((save / "run.json").read_text())["method"] == "gradinit-adam"
    assert (save / "gradinit_scales.json").is_file()
    command = (save / "command.sh").read_text()
    assert "--warmup-updates 0" in command and "--lr-scheduler polynomial_decay" in command

    r = run(PY, HERE / "evaluate.py", save, prepared, "--cpu", "--detok", "none",
            "--max-len-a", "0", "--max-len-b", "20")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    bleu = json.loads((save / "bleu.json").read_text())
    assert bleu["sentences"] == 30  # --required-batch-size-multiple 1: nothing dropped
    for key in ("tokenized_bleu", "detok_bleu", "fairseq_bleu"):
        assert isinstance(bleu[key], float), bleu
    assert "tok:13a" in bleu["detok_signature"] and "signature:" in r.stdout

    out = tmp_path / "table.md"
    r = run(PY, HERE / "collect.py", tmp_path / "runs", "--out", out)
    assert r.returncode == 0, r.stderr
    table = out.read_text()
    assert "| method | lr | beta2 | updates | size | other flags | BLEU (mean +- std) |" in table
    row = [line for line in table.splitlines() if line.startswith("| gradinit-adam")]
    assert len(row) == 1 and "| 0.0005 | 0.98 | 3 | small | --gradinit-iters 3 --encoder-layers 1 " in row[0]
    assert "| 1/1 |" in row[0] and f"- diverged: {save} (BLEU " in table  # BLEU < 1


def test_sweep_loss_grid(prepared, tmp_path):
    r = run(PY, HERE / "sweep.py", "--method", "vanilla", "--lrs", "5e-4", "--beta2s", "0.98",
            "--metric", "loss", prepared, tmp_path / "sweep",
            "--", "--small", "--cpu", "--max-update", "2", *TINY_ARCH)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    grid = (tmp_path / "sweep" / "grid.md").read_text()
    assert "| 0.98 |" in grid and "x" not in grid.splitlines()[-1]
    assert (tmp_path / "sweep" / "grid.png").stat().st_size > 1000


def fake_run(path, bleu, loss, **settings):
    """A finished train.sh + evaluate.py run directory, without training."""
    path.mkdir(parents=True)
    info = dict(method="gradinit-adam", lr=5e-4, beta2=0.98, seed=1, max_update=100000,
                small=False, extra=[])
    info.update(settings)
    (path / "run.json").write_text(json.dumps(info))
    (path / "train.log").write_text(f"... | valid on 'valid' subset | loss {loss} | nll_loss 3.1\n")
    if bleu is not None:
        (path / "bleu.json").write_text(json.dumps({"tokenized_bleu": bleu}))


def test_collect_groups_runs_by_every_setting_but_the_seed_and_writes_the_diverged_to_out(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "a1", 36.0, 4.0, seed=1)
    fake_run(runs / "a2", 34.0, 4.2, seed=2)  # same setting: one row, mean 35
    fake_run(runs / "a3", 0.5, "nan", seed=3)  # same setting, diverged
    fake_run(runs / "small", 2.0, 7.0, small=True, max_update=300)
    fake_run(runs / "short", 20.0, 5.0, max_update=300)
    fake_run(runs / "iters", 30.0, 4.5, extra=["--gradinit-iters", "200"])
    fake_run(runs / "noeval", None, 4.0, lr=1e-3)
    out = tmp_path / "table.md"
    r = run(PY, HERE / "collect.py", runs, "--out", out)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert text == r.stdout
    rows = [l for l in text.splitlines() if l.startswith("| gradinit-adam")]
    assert len(rows) == 5, rows
    full = [l for l in rows if "| 100000 | full | - |" in l and "| 0.0005 |" in l]
    assert len(full) == 1 and "| 23.50 +- " in full[0] and "| 1,2,3 |" in full[0] and "| 1/3 |" in full[0]
    assert any("| 300 | small | - | 2.00 +- 0.00 | 1 |" in l for l in rows), rows
    assert any("| 300 | full | - | 20.00 +- 0.00 | 1 |" in l for l in rows), rows
    assert any("| --gradinit-iters 200 | 30.00 +- 0.00 |" in l for l in rows), rows
    assert f"- diverged: {runs / 'a3'} (valid loss nan, BLEU 0.50 < 1)" in text
    assert f"- diverged: {runs / 'small'}" not in text  # loss 7 < --max-loss 8, BLEU 2 >= 1
    assert f"- not evaluated (no tokenized_bleu in bleu.json): {runs / 'noeval'}" in text
