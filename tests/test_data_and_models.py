"""Data and models the plugin cannot train on are refused at start-up with one line; the
model families it supports run end to end (issue 14, rows 10, 11, 14)."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import BIN, TINY_ARCH, USER_COMMAND, fairseq, read_json, train


def one_line_failure(proc):
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fairseq-gradinit: error: "), last
    return last


@pytest.fixture(scope="module")
def variant(data_bin, tmp_path_factory):
    """variant(n, extra) -> a data-bin whose training split is the first n demo pairs."""
    prep = Path(data_bin).parent
    root = tmp_path_factory.mktemp("variants")

    def make(n):
        out = root / f"n{n}"
        for lang in ("de", "en"):
            lines = (prep / "spm" / f"train.{lang}").read_text().splitlines()[:n]
            (root / f"train{n}.{lang}").write_text("".join(l + "\n" for l in lines))
        proc = fairseq("fairseq-preprocess", "-s", "de", "-t", "en",
                       "--srcdict", Path(data_bin) / "dict.de.txt", "--tgtdict", Path(data_bin) / "dict.en.txt",
                       "--trainpref", root / f"train{n}", "--validpref", prep / "spm" / "valid",
                       "--destdir", out)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return str(out)

    return make


def test_an_empty_training_split_is_refused_naming_the_split(variant, tmp_path):
    last = one_line_failure(train(variant(0), tmp_path / "ck"))
    assert "the 'train' split in" in last and "is empty" in last


def test_a_few_sentences_ask_for_required_batch_size_multiple_1(variant, tmp_path):
    data = variant(5)
    last = one_line_failure(train(data, tmp_path / "ck"))
    assert "has 5 usable sentences" in last and "--required-batch-size-multiple 1" in last
    # What the message says works: GradInit and training run.
    log = train(data, tmp_path / "ck2", "--required-batch-size-multiple", "1", "--max-update", "2")
    assert log.returncode == 0 and "GradInit done" in log.stdout + log.stderr, log.stderr[-2000:]


def test_a_fully_filtered_training_split_is_refused_naming_the_limits(data_bin, tmp_path):
    proc = train(data_bin, tmp_path / "ck", "--max-source-positions", "1", "--max-target-positions", "1",
                 "--skip-invalid-size-inputs-valid-test")  # fmt: skip
    last = one_line_failure(proc)
    assert "all 400 sentences of the training set 'train' are longer" in last and "--max-source-positions" in last


def test_max_tokens_below_the_longest_valid_sentence_names_max_tokens(data_bin, tmp_path):
    last = one_line_failure(train(data_bin, tmp_path / "ck", "--max-tokens", "20"))
    assert "of the 'valid' set has" in last and "--max-tokens" in last
    assert "--skip-invalid-size-inputs-valid-test" in last


def test_a_missing_data_directory_is_refused_naming_it(tmp_path):
    last = one_line_failure(train(str(tmp_path / "nowhere"), tmp_path / "ck"))
    assert f"no data directory {tmp_path / 'nowhere'}" in last


def test_a_read_only_save_dir_fails_in_fairseq_with_the_message_the_readme_quotes(data_bin, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    save_dir = folder / "ck" if not os.access(folder, os.W_OK) else "/sys/fairseq-gradinit-test/ck"
    proc = train(data_bin, save_dir)
    assert proc.returncode != 0
    # fairseq checks the save dir before any plugin code runs (README, Troubleshooting).
    assert "Permission denied" in proc.stderr or "Operation not permitted" in proc.stderr or "Read-only" in proc.stderr


# ----- model families -----

LSTM = ["--arch", "lstm", "--encoder-embed-dim", "16", "--encoder-hidden-size", "16", "--decoder-embed-dim", "16",
        "--decoder-hidden-size", "16", "--decoder-out-embed-dim", "16", "--encoder-layers", "1", "--decoder-layers", "1"]  # fmt: skip
FCONV = ["--arch", "fconv", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--decoder-out-embed-dim", "16",
         "--encoder-layers", "[(16, 3)] * 2", "--decoder-layers", "[(16, 3)] * 2"]  # fmt: skip
LIGHTCONV = ["--arch", "lightconv_iwslt_de_en", "--encoder-layers", "1", "--decoder-layers", "1",
             "--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-conv-dim", "16", "--decoder-conv-dim", "16",
             "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
             "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
             "--encoder-kernel-size-list", "[3]", "--decoder-kernel-size-list", "[3]"]  # fmt: skip


def train_arch(data_bin, save_dir, arch_flags, *extra):
    command = [a for a in USER_COMMAND if a not in ("--arch", "transformer_iwslt_de_en", "--share-decoder-input-output-embed")]
    args = [data_bin, *command, *arch_flags, "--save-dir", save_dir, "--cpu", "--no-progress-bar",
            "--log-format", "simple", "--log-interval", "1", "--max-update", "2", "--gradinit-iters", "4", "--seed", "7", *extra]  # fmt: skip
    return fairseq("fairseq-train", *args)


def test_lstm_runs_gradinit_on_halves_trimmed_of_padding_and_trains(data_bin, tmp_path):
    proc = train_arch(data_bin, tmp_path / "ck", LSTM)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "GradInit done" in log and "num_updates=2" in log
    scales = read_json(tmp_path / "ck" / "gradinit_scales.json")["scales"]
    assert "encoder.embed_tokens.weight" in scales


def test_fconv_scales_its_convolutions_and_weight_norm_magnitudes_not_directions(data_bin, tmp_path):
    # Passes once issue 12's selection.py (ConvTBC weights, weight_g magnitudes) is merged.
    proc = train_arch(data_bin, tmp_path / "ck", FCONV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scales = read_json(tmp_path / "ck" / "gradinit_scales.json")["scales"]
    assert any(n.startswith("encoder.convolutions.") for n in scales), sorted(scales)
    assert any(n.startswith("decoder.convolutions.") for n in scales), sorted(scales)
    assert not [n for n in scales if n.endswith("weight_v")], sorted(scales)


def test_an_unsupported_model_family_is_refused_at_start_up_with_the_reason(data_bin, tmp_path):
    last = one_line_failure(train_arch(data_bin, tmp_path / "ck", LIGHTCONV))
    assert "--arch lightconv_iwslt_de_en (LightConvModel) is not a model family GradInit" in last
    assert "lstm" in last and "fconv" in last
    assert not (tmp_path / "ck" / "gradinit_scales.json").exists()


def test_split_halves_are_what_the_collater_makes_of_their_sentences(data_bin):
    """No all-padding column is left in either half (fairseq's LSTM asserts on it)."""
    from test_fairseq_inprocess import build

    from fairseq_gradinit.fairseq_batches import split_sample

    _, task, model, _ = build(data_bin)
    dataset = task.dataset("train")
    pad = task.target_dictionary.pad()
    ids = list(range(12))
    full = dataset.collater([dataset[i] for i in ids])
    for part in split_sample(full, 0.5, pad):
        order = part["id"].tolist()
        alone = dataset.collater([dataset[i] for i in order])
        # The collater sorts by source length; compare sentence by sentence.
        rank = {i: k for k, i in enumerate(alone["id"].tolist())}
        index = torch.tensor([rank[i] for i in order])
        for key in ("src_tokens", "prev_output_tokens"):
            assert torch.equal(part["net_input"][key], alone["net_input"][key][index]), key
        assert torch.equal(part["target"], alone["target"][index])


# ----- stopping -----


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_gradinit_ends_the_run_at_once_with_nothing_written(data_bin, tmp_path, sig):
    save_dir = tmp_path / "ck"
    args = [data_bin, *USER_COMMAND, *TINY_ARCH, "--cpu", "--gradinit-iters", "100000",
            "--save-dir", save_dir, "--no-progress-bar"]  # fmt: skip
    # The default disposition, whatever the shell that started pytest ignores.
    proc = subprocess.Popen([str(BIN / "fairseq-train"), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    for line in proc.stdout:
        if "GradInit: " in line:
            break
    time.sleep(3)  # several epochs of the small training set: new epoch iterators
    proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, (proc.returncode, out[-2000:])
    assert f"stopped by {signal.Signals(sig).name} during GradInit" in out
    assert sorted(p.name for p in save_dir.iterdir()) == []
