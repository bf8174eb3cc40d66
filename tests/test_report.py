"""fairseq-gradinit-report: the table, the plots, the summary and the CLI's errors."""
import json
import logging
import math
import os
import shutil
import struct

import numpy as np
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


def synthetic_rows(layers=6):
    """Rows of a Post-LN fairseq transformer with ``layers`` per stack, made-up statistics:
    linear weights spread over three decades of sigma(g), LayerNorm weights within 0.9-1.15."""
    names = ["encoder.embed_tokens.weight"]
    for i in range(layers):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"):
            names += [f"encoder.layers.{i}.{part}.weight", f"encoder.layers.{i}.{part}.bias"]
        names += [f"encoder.layers.{i}.self_attn_layer_norm.weight", f"encoder.layers.{i}.final_layer_norm.weight"]
    names.append("decoder.embed_tokens.weight")
    for i in range(layers):
        for part in ("self_attn.q_proj", "self_attn.out_proj", "encoder_attn.q_proj", "encoder_attn.out_proj", "fc1", "fc2"):
            names += [f"decoder.layers.{i}.{part}.weight", f"decoder.layers.{i}.{part}.bias"]
        names += [f"decoder.layers.{i}.self_attn_layer_norm.weight", f"decoder.layers.{i}.final_layer_norm.weight"]
    rows = []
    for k, name in enumerate(names):
        label, group = report.describe(name)
        kind = "layernorm" if "layer_norm" in name else "embedding" if "embed" in name else "linear"
        scale = 0.9 + 0.25 * (k % 7) / 6 if kind == "layernorm" else 0.2 + 1.6 * (k % 11) / 10
        weight = 1.0 if kind == "layernorm" else 0.03
        grad = 10.0 ** (-5 + 3 * (k % 13) / 12)
        rows.append(report.Row(name, label, group, kind, name.endswith(".bias"), scale,
                               weight, weight * scale, grad, grad * scale))
    return rows


RUN = report.RunInfo(name="iwslt-gi-s1", target="sgd", iterations=780, constraint_iterations=61, batches=8)


def drawn(figures):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for fig in figures.values():
        FigureCanvasAgg(fig).draw()  # tick positions and labels exist only after a draw
    return figures


def curve_axes(fig):
    return [ax for ax in fig.axes if ax.get_legend() is not None]


def test_figure_titles_name_the_run_the_target_optimizer_and_the_iterations():
    figs = report.figures(synthetic_rows(), RUN)
    assert sorted(figs) == PLOTS
    for name, fig in figs.items():
        title = fig.get_suptitle()
        assert "iwslt-gi-s1" in title and "GradInit for SGD" in title and "780 iterations" in title, (name, title)
    assert "over 8 training batches" in figs["gradients.png"].get_suptitle()
    # Biases are not in the curves: the figure says so and where they are.
    assert "not shown: 72 biases (their scales are in scales.png)" in figs["weights.png"].get_suptitle()


def test_every_axis_is_labelled_with_what_it_measures():
    figs = report.figures(synthetic_rows(), RUN)
    for name in ("weights.png", "gradients.png"):
        axes = curve_axes(figs[name])
        assert len(axes) == 2, name
        for ax in axes:
            assert ax.get_xlabel().startswith("tensor ("), name
        units = "mean |w|" if name == "weights.png" else "nats/token"
        assert all(units in ax.get_ylabel() for ax in axes), [ax.get_ylabel() for ax in axes]
    heat = [ax for ax in figs["scales.png"].axes if ax.get_title() in ("encoder", "decoder")]
    assert [ax.get_title() for ax in heat] == ["encoder", "decoder"]
    assert all(ax.get_xlabel().startswith("layer") for ax in heat) and heat[0].get_ylabel()


def test_every_colour_is_named_in_a_legend_or_a_colour_bar():
    figs = report.figures(synthetic_rows(), RUN)
    for name in ("weights.png", "gradients.png"):
        for ax in curve_axes(figs[name]):
            assert [t.get_text() for t in ax.get_legend().get_texts()] == ["initial (fairseq)", "after GradInit"]
            curves = [l for l in ax.get_lines() if l.get_gid() != "stack-divider"]
            assert {l.get_color() for l in curves} == {"tab:blue", "tab:orange"}  # the two legend entries
    bars = [ax for ax in figs["scales.png"].axes if "scaled down" in ax.get_ylabel()]
    assert len(bars) == 1  # the colour bar of the heat maps, with its meaning


def test_a_dashed_divider_separates_encoder_and_decoder_tensors():
    rows = synthetic_rows()
    for name in ("weights.png", "gradients.png"):
        linear, norms = curve_axes(report.figures(rows, RUN)[name])
        for ax, kinds in ((linear, ("linear", "embedding")), (norms, ("layernorm",))):
            panel = [r for r in rows if r.kind in kinds and not r.is_bias]
            first_decoder = next(i for i, r in enumerate(panel) if r.name.startswith("decoder."))
            divider = [l for l in ax.get_lines() if l.get_gid() == "stack-divider"]
            assert len(divider) == 1 and list(divider[0].get_xdata()) == [first_decoder - 0.5] * 2
            assert {"encoder", "decoder"} <= {t.get_text() for t in ax.texts}


def test_axes_start_at_the_first_tensor_and_show_at_least_four_labelled_values():
    figs = drawn(report.figures(synthetic_rows(), RUN))
    for name in ("weights.png", "gradients.png"):
        for ax in curve_axes(figs[name]):
            assert -1 < ax.get_xlim()[0] < 0, (name, ax.get_xlim())  # no empty margin
            low, high = ax.get_ylim()
            labelled = [t for t in ax.yaxis.get_major_ticks() if low <= t.get_loc() <= high and t.label1.get_text()]
            assert len(labelled) >= 4, (name, ax.get_title(), [t.label1.get_text() for t in labelled])
    linear, norms = curve_axes(figs["gradients.png"])
    assert linear.get_yscale() == "log"  # three decades
    assert report.figures(synthetic_rows(), RUN)["weights.png"].axes[1].get_yscale() == "linear"  # 0.9-1.15


def test_scales_of_hundreds_of_tensors_fit_a_screen_one_cell_per_tensor():
    rows = synthetic_rows(layers=18)
    assert len(rows) > 400
    fig = report.figures(rows, RUN)["scales.png"]
    width, height = fig.get_size_inches()
    assert width <= 18 and height <= 12, (width, height)
    cells = sum(int(np.isfinite(im.get_array().filled(np.nan)).sum()) for ax in fig.axes for im in ax.get_images())
    assert cells == len(rows)


def test_run_info_comes_from_the_save_dir(run):
    info = report.run_info(str(run), batches=3)
    assert info.name == run.name and info.target == "adam" and info.iterations == 6
    assert info.constraint_iterations == read_json(run / "gradinit_scales.json")["constraint_iterations"]
    assert info.title().startswith(f"{run.name}: GradInit for Adam, 6 iterations, ")


def test_a_run_without_scaled_tensors_still_gets_its_three_figures(tmp_path):
    paths = report.plot([], str(tmp_path), RUN)
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == PLOTS
