"""fairseq-gradinit-report: the table, the plots, the summary and the CLI's errors."""
import json
import logging
import math
import os
import shutil
import struct

import pytest

from conftest import fairseq, read_json, train
from fairseq_gradinit import report

# Few, small batches: the statistics only need to be computed the same way twice.
BATCHES, MAX_TOKENS = 3, 256
PLOTS = ["gradients.png", "scales.png", "weights.png"]


@pytest.fixture(scope="module")
def run(data_bin, tmp_path_factory):
    """A tiny 1+1-layer GradInit run that stops with checkpoint_gradinit.pt."""
    save_dir = tmp_path_factory.mktemp("report_run")
    proc = train(data_bin, save_dir, "--gradinit-only")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return save_dir


@pytest.fixture(scope="module")
def rows(run, data_bin):
    return report.collect(str(run), data_bin, batches=BATCHES, max_tokens=MAX_TOKENS)


def copy_run(run, to, scales=None):
    """The run's checkpoint and JSON in another directory, the scales optionally replaced."""
    to.mkdir()
    shutil.copy(run / "checkpoint_gradinit.pt", to)
    payload = read_json(run / "gradinit_scales.json")
    if scales is not None:
        payload["scales"] = scales(payload["scales"])
    (to / "gradinit_scales.json").write_text(json.dumps(payload))
    return to


def png_size(path):
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_one_row_per_scaled_tensor_in_model_order_with_the_json_scales(run, rows, tmp_path):
    scales = read_json(run / "gradinit_scales.json")["scales"]
    names = [r.name for r in rows]
    assert sorted(names) == sorted(scales)
    assert all(r.scale == scales[r.name] for r in rows)
    # Encoder before decoder; inside an attention block q, k, v, out (fairseq: k, v, q).
    assert names.index("encoder.layers.0.final_layer_norm.weight") < names.index("decoder.embed_tokens.weight")
    block = [n for n in names if n.startswith("decoder.layers.0.encoder_attn.") and n.endswith("weight")]
    assert [n.split(".")[-2] for n in block] == ["q_proj", "k_proj", "v_proj", "out_proj"]
    for r in rows:
        assert r.weight_after == pytest.approx(r.scale * r.weight_before, rel=1e-5), r.name
        assert math.isfinite(r.grad_std_before) and math.isfinite(r.grad_std_after), r.name
    assert [r.kind for r in rows if r.name.endswith("fc1.weight")] == ["linear", "linear"]
    assert {r.kind for r in rows if "layer_norm" in r.name} == {"layernorm"}

    report.write_markdown(rows, str(tmp_path / "report.md"))
    lines = (tmp_path / "report.md").read_text().splitlines()
    body = [l for l in lines if l.startswith("| ") and not l.startswith("| tensor ")]
    assert len(body) == len(scales)
    for line in body:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[2]) == pytest.approx(scales[cells[0]], abs=5e-5)
    assert lines[-1] == report.summary(rows)


def test_plots_are_pngs_of_a_readable_size(rows, tmp_path):
    paths = report.plot(rows, str(tmp_path))
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == PLOTS
    for name in PLOTS:
        width, height = png_size(tmp_path / name)
        assert width >= 400 and height >= 300, (name, width, height)


def test_scales_of_one_give_identical_before_and_after(run, data_bin, tmp_path, caplog):
    ones = copy_run(run, tmp_path / "ones", scales=lambda s: {n: 1.0 for n in s})
    with caplog.at_level(logging.WARNING, logger="fairseq_gradinit.report"):
        rows = report.collect(str(ones), data_bin, batches=BATCHES, max_tokens=MAX_TOKENS)
    for r in rows:
        assert r.scale == 1.0 and r.weight_before == r.weight_after, r.name
        assert r.grad_std_before == r.grad_std_after, r.name
    assert report.summary(rows).startswith("GradInit scaled no group down")
    # The checkpoint holds GradInit's weights, which these scales do not give.
    assert "differ from the rebuilt initial model" in caplog.text


def test_cli_writes_the_report_into_the_save_dir_and_prints_table_and_summary(run, data_bin, capsys):
    report.cli_main([str(run), data_bin, "--batches", "2", "--max-tokens", str(MAX_TOKENS)])
    out, err = capsys.readouterr()
    assert "| encoder.layers.0.fc1.weight | E0 fc1 |" in out
    assert out.splitlines()[-2] == report.summary(report_rows(run))
    assert "warning" not in err  # the checkpoint's weights are the rebuilt initial x scale
    folder = run / "gradinit_report"
    assert sorted(p.name for p in folder.iterdir()) == sorted(PLOTS + ["report.md", "rows.json"])
    scales = read_json(run / "gradinit_scales.json")["scales"]
    assert {r.name: r.scale for r in report_rows(run)} == scales


def report_rows(run):
    return [report.Row(**d) for d in read_json(run / "gradinit_report" / "rows.json")]


def test_cli_without_scales_json_says_so_in_one_line(data_bin, tmp_path):
    (tmp_path / "run").mkdir()
    proc = fairseq("fairseq-gradinit-report", tmp_path / "run", data_bin)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fairseq-gradinit-report: error: no gradinit_scales.json in "), last


@pytest.mark.parametrize("case, message", [
    ("no_dir", "no save directory"),
    ("no_checkpoint", "no checkpoint"),
    ("unknown_tensor", "names tensors not in the model"),
])  # fmt: skip
def test_cli_errors_exit_2_with_one_line(run, data_bin, tmp_path, capsys, case, message):
    if case == "no_dir":
        save_dir = tmp_path / "missing"
    elif case == "no_checkpoint":
        save_dir = tmp_path / "json_only"
        save_dir.mkdir()
        shutil.copy(run / "gradinit_scales.json", save_dir)
    else:
        rename = lambda s: {n.replace("layers.0.fc1", "layers.7.fc1"): v for n, v in s.items()}
        save_dir = copy_run(run, tmp_path / "renamed", scales=rename)
    with pytest.raises(SystemExit) as e:
        report.cli_main([str(save_dir), data_bin])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fairseq-gradinit-report: error: ") and message in err[0], err


def test_labels_and_summary_of_the_most_down_scaled_groups():
    assert report.describe("encoder.layers.3.fc1.weight") == ("E3 fc1", "encoder FFN fc1")
    assert report.describe("decoder.layers.5.self_attn.q_proj.weight") == ("D5 self q", "decoder self-attention q")
    assert report.describe("decoder.layers.0.encoder_attn.k_proj.bias")[0] == "D0 enc k b"
    assert report.describe("decoder.layer_norm.weight") == ("D final LN", "decoder final LayerNorm")

    def row(name, scale):
        label, group = report.describe(name)
        return report.Row(name, label, group, "linear", False, scale, 1.0, scale, 1.0, 1.0)

    rows = [
        row("encoder.layers.0.fc1.weight", 1.2),
        row("encoder.layers.0.fc2.weight", 0.50),
        row("encoder.layers.1.fc2.weight", 0.54),
        row("decoder.layers.0.fc1.weight", 0.9),
        row("decoder.layers.0.self_attn.q_proj.weight", 0.95),
        row("decoder.layer_norm.weight", 0.31),
    ]
    assert report.summary(rows) == (
        "GradInit scaled down most: decoder final LayerNorm x0.31; "
        "encoder FFN fc2 mean x0.52 (2 tensors); decoder FFN fc1 x0.90"
    )


def read_only_dir(tmp_path):
    """A directory this process cannot create files in (root ignores file modes: /sys)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # running as root
        return "/sys/fairseq-gradinit-test/report"
    return str(folder / "report")


@pytest.mark.parametrize("flags, message", [
    (["--max-tokens", "-5"], "--max-tokens must be >= 1 (got -5)"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1 (got 0)"),
    (["--batches", "1"], "--batches must be >= 2"),
    (["--seed", "-1"], "--seed must be in [0, "),
])  # fmt: skip
def test_cli_refuses_out_of_range_numbers_in_one_line(run, data_bin, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        report.cli_main([str(run), data_bin, "--out", str(tmp_path / "out"), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fairseq-gradinit-report: error: ") and message in err[0], err


def test_cli_max_tokens_below_every_sentence_is_one_line_not_a_traceback(run, data_bin, tmp_path):
    proc = fairseq("fairseq-gradinit-report", run, data_bin, "--max-tokens", "1", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fairseq-gradinit-report: error: ") and "--max-tokens" in last, last


def test_cli_on_a_read_only_output_path_exits_2_with_one_line(run, data_bin, tmp_path):
    out = read_only_dir(tmp_path)
    proc = fairseq("fairseq-gradinit-report", run, data_bin, "--out", out, "--batches", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fairseq-gradinit-report: error: cannot write to {out} (--out)"), last
