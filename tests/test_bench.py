"""bench/stability.py: the no-warmup comparison runs end to end and reports what it measured."""
import json
import math
import os
import re
import subprocess
import sys

from conftest import ROOT, TINY_ARCH, load_script

stability = load_script("bench_stability", "bench/stability.py")


def test_stability_bench_trains_every_method_and_writes_table_curves_and_bleu(data_bin, tmp_path):
    out = tmp_path / "stability"
    argv = ["--data", data_bin, "--out", str(out), "--cpu", "--updates", "4", "--interval", "2",
            "--warmup", "2", "--gradinit-iters", "3", "--model-args", " ".join(["--arch", "transformer", *TINY_ARCH])]  # fmt: skip
    stability.main(argv)

    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results] == list(stability.METHODS)
    for r in results:
        assert r["exit_code"] == 0
        assert [u for u, _ in r["valid"]] == [2, 4]
        assert [u for u, _ in r["train"]] == [2, 4]
        assert all(math.isfinite(loss) for _, loss in r["valid"] + r["train"])
        assert r["bleu"]["signature"].startswith("nrefs:1")
        assert not list((out / f"{r['method']}-seed1").glob("checkpoint*.pt"))
    assert results[2]["gradinit"].startswith("GradInit done")
    assert "--gradinit" not in (out / "vanilla-seed1" / "command.txt").read_text()
    preln = (out / "preln-seed1" / "command.txt").read_text()
    assert "--encoder-normalize-before" in preln and "--warmup-updates 0" in preln
    assert "--warmup-updates 2" in (out / "warmup-seed1" / "command.txt").read_text()
    table = (out / "results.md").read_text()
    assert "| gradinit |" in table and "@4" in table and "verdict:" in table
    assert "\nmachine: " in table and " CPU cores, torch " in table and "; date: " in table
    assert (out / "curves.png").stat().st_size > 1000


def test_stability_bench_does_not_rerun_a_finished_run_with_the_same_command(data_bin, tmp_path, capsys):
    argv = ["--data", data_bin, "--out", str(tmp_path), "--cpu", "--updates", "2", "--interval", "2",
            "--methods", "vanilla", "--no-bleu", "--model-args", " ".join(["--arch", "transformer", *TINY_ARCH])]  # fmt: skip
    stability.main(argv)
    stability.main(argv)
    assert "done before with the same command" in capsys.readouterr().out
    stability.main(argv + ["--lr", "1e-4"])
    assert "done before" not in capsys.readouterr().out


def _result(method, losses):
    return {"method": method, "seed": 1, "seconds": 60.0, "train": [], "gradinit": None,
            "valid": list(zip((25, 50), losses))}  # fmt: skip


def test_verdict_says_when_gradinit_falls_behind_the_warmup_baseline():
    ahead = [_result("warmup", (9.0, 8.5)), _result("gradinit", (8.9, 8.5))]
    behind = [_result("warmup", (9.0, 8.5)), _result("gradinit", (8.9, 8.6))]
    assert "at least as fast" in stability.verdict(ahead, [25, 50])
    assert "BEHIND" in stability.verdict(behind, [25, 50]) and "[50]" in stability.verdict(behind, [25, 50])
    assert "needs" in stability.verdict(ahead[:1], [25, 50])


def test_parse_log_reads_fairseq_json_lines(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        '2026-01-01 00:00:00 | INFO | fairseq_gradinit | GradInit done in 1.0s: 0/3 iterations\n'
        '2026-01-01 00:00:01 | INFO | train_inner | {"epoch": 1, "loss": "9.5", "num_updates": "25"}\n'
        '2026-01-01 00:00:02 | INFO | valid | {"epoch": 1, "valid_loss": "9.1", "valid_num_updates": "25"}\n'
        '2026-01-01 00:00:03 | INFO | train | {"epoch": 1, "train_loss": "9.4", "train_num_updates": "25"}\n'
    )
    parsed = stability.parse_log(log)
    assert parsed == {"train": [(25, 9.5)], "valid": [(25, 9.1)], "gradinit": "GradInit done in 1.0s: 0/3 iterations"}


def test_cost_bench_prints_every_ratio_with_its_target(data_bin, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cost.py"), "--data", data_bin, "--models", "tiny",
         "--max-tokens", "256", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "cost.md")],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| tiny |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 11
    ratios = cells[3:9]
    assert all(c.endswith(" ok") or "MISSES" in c for c in ratios), row
    assert all(float(c.split("x")[0]) > 0 for c in ratios)
    agreement = float(cells[9].split("%")[0])
    assert agreement >= 95 and " ok " in cells[9], row  # both exact: rounding only
    assert cells[10].endswith("%")
    assert row in (tmp_path / "cost.md").read_text()
    last = (tmp_path / "cost.md").read_text().strip().splitlines()[-2:]
    assert last[0].startswith("command: ") and last[1].startswith("machine: ") and "; date: " in last[1], last


# bench/depth.py, bench/runs.py, bench/gpu.py: every initialization side by side

depth = load_script("bench_depth", "bench/depth.py")
runs = load_script("bench_runs", "bench/runs.py")
gpu = load_script("bench_gpu", "bench/gpu.py")


def test_depth_bench_gives_each_method_its_arch_and_flags():
    def args(method, arch="transformer"):
        return depth.method_args(method, arch, ["--dropout", "0.1"], 7, 0.5)

    assert args("vanilla") == ["--arch", "transformer", "--dropout", "0.1"]
    assert args("admin", "transformer_iwslt_de_en")[:2] == ["--arch", "transformer_wskip_iwslt_de_en"]
    assert args("deepnet")[:2] == ["--arch", "transformer_wskip"] and args("deepnet")[-2:] == ["--wskip-init", "deepnet"]
    assert args("admin-analytic")[-1] == "admin-analytic"
    assert args("tfixup", "transformer_iwslt_de_en")[:2] == ["--arch", "transformer_tfixup_iwslt_de_en"]
    assert args("preln")[-2:] == ["--encoder-normalize-before", "--decoder-normalize-before"]
    gradinit, wskip = args("gradinit"), args("gradinit-wskip")
    assert gradinit[-5:] == ["--gradinit", "--gradinit-iters", "7", "--gradinit-lr", "0.5"]
    assert "--gradinit-wskip" in wskip and wskip[1] == "transformer_wskip" and "--gradinit" in wskip
    for method in depth.METHODS:
        if not method.startswith("gradinit"):
            assert "--gradinit" not in args(method)
    built = depth.build_runs(depth.SCALES["tiny"], depth.METHODS, [1, 2], ROOT / "x", "cpu")
    assert [(r.method, r.seed) for r in built][:2] == [("vanilla", 1), ("warmup", 1)] and len(built) == 18
    assert {r.method for r in built if r.warmup} == {"warmup"}


def test_depth_bench_trains_every_method_and_writes_table_curves_and_scales(data_bin, tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results"
    depth.main(["--data", data_bin, "--scale", "tiny", "--seeds", "1", "--jobs", "3", "--no-bleu",
                "--out", str(out), "--results", str(results)])  # fmt: skip

    saved = json.loads((results / "depth-tiny.json").read_text())
    assert [r["method"] for r in saved["runs"]] == list(depth.METHODS)
    assert 0 < saved["unigram_bits"] < math.log2(100)
    for r in saved["runs"]:
        assert r["exit_code"] == 0 and r["status"] == "done", r["method"]
        assert [u for u, _ in r["valid"]] == [2, 4] and len(r["valid_nll"]) == 2
        assert all(math.isfinite(v) for _, v in r["valid"])
    assert "w_skip_ffn" in " ".join(saved["runs"][-1]["scales"])  # gradinit-wskip scales w_skip too
    assert not any("w_skip" in n for n in saved["runs"][-2]["scales"])  # gradinit: weights only
    table = (results / "depth-tiny.md").read_text()
    for method in depth.METHODS:
        assert f"| {method} |" in table
    assert "GradInit scales per tensor kind" in table and "unigram" in table
    assert (results / "depth-tiny.png").stat().st_size > 1000
    assert "--wskip-init deepnet" in (out / "deepnet-seed1" / "command.txt").read_text()
    assert not list(out.glob("*/checkpoint*.pt"))


def _run(method, valid_nll, status="done", exit_code=0, nonfinite=False):
    return {"method": method, "seed": 1, "status": status, "exit_code": exit_code, "nonfinite": nonfinite,
            "seconds": 60.0, "train": [(10, 9.0)], "valid": [(10, v + 0.5) for _, v in valid_nll],
            "valid_nll": valid_nll, "gradinit": None}  # fmt: skip


def test_verdict_tells_diverged_stuck_and_learning_runs_apart():
    assert runs.verdict_of(_run("a", [(10, 7.0)]), 8.3) == "ok"
    assert runs.verdict_of(_run("a", [(10, 8.3)]), 8.3) == "stuck"
    assert runs.verdict_of(_run("a", [(10, 7.0), (20, math.nan)]), 8.3) == "diverged"
    assert runs.verdict_of(_run("a", [(10, 7.0)], exit_code=1, nonfinite=True), 8.3) == "diverged"
    assert runs.verdict_of(_run("a", [(10, 7.0)], exit_code=2), 8.3) == "error"
    assert runs.verdict_of(_run("a", [], status="skipped", exit_code=None), 8.3) == "not run"
    table = "\n".join(runs.table([_run("m", [(10, 7.0)]), {**_run("m", [(10, 9.0)]), "seed": 2}], 8.3, "t"))
    assert "| 1/2 (stuck) |" in table


def test_scales_pattern_names_the_tensors_gradinit_pinned_at_the_floor():
    scales = {"encoder.layers.0.fc1.weight": 0.01, "encoder.layers.1.fc1.weight": 0.19,
              "encoder.layers.0.fc2.weight": 1.1, "encoder.layers.1.fc2.weight": 0.9,
              "encoder.layers.0.fc2.bias": 0.005, "encoder.layers.1.fc2.bias": 0.0}  # fmt: skip
    settings = {"min_scale": 0.01, "min_bias_scale": 0.0}
    result = {"method": "gradinit", "seed": 1, "scales": {"scales": scales, "settings": settings}}
    text = "\n".join(runs.scales_pattern([result]))
    assert "| encoder.layers.*.fc1.weight | 0.10 (min 0.01) floor: L0/s1 |" in text
    assert "| encoder.layers.*.fc2.weight | 1.00 (min 0.90) |" in text
    assert "| encoder.layers.*.fc2.bias | 0.00 (min 0.00) floor: L1/s1 |" in text  # 0.005 is above 0
    assert "scaled down (mean < 0.5): encoder.layers.*.fc1.weight" in text


def test_a_run_started_past_the_budget_is_skipped_and_counted_as_not_run(tmp_path):
    run = runs.Run("vanilla", 1, tmp_path / "r", [], 4, 1e-3, 2, 256)
    result = runs.execute(run, tmp_path, runs.Budget(5, min_start=60))
    assert result["status"] == "skipped" and not (tmp_path / "r").exists()
    assert "| 0/0; 1 not run |" in "\n".join(runs.table([result], 8.0, "t"))


def test_call_kills_the_whole_process_group_when_time_is_up(tmp_path):
    marker = tmp_path / "grandchild-survived"
    cmd = ["bash", "-c", f"(sleep 3; touch {marker}) & sleep 30"]
    assert runs.call(cmd, tmp_path / "log", timeout=1) is None
    assert "killed after" in (tmp_path / "log").read_text()
    import time

    time.sleep(3.5)
    assert not marker.exists()


def test_gpu_bench_tiny_preset_runs_cost_both_groups_and_bleu_on_cpu(data_bin, tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    gpu.main(["--preset", "tiny", "--data", data_bin, "--out", str(out), "--results", str(results),
              "--archive", str(tmp_path / "runs.tar.gz")])  # fmt: skip

    for folder in (results, out / "results"):
        names = {p.name for p in folder.iterdir()}
        assert {"gpu-tiny.md", "gpu-tiny-cost.md", "gpu-tiny-iwslt.md", "gpu-tiny-depth.md",
                "gpu-tiny-iwslt.png", "gpu-tiny-depth.png"} <= names  # fmt: skip
    assert "| tiny |" in (results / "gpu-tiny-cost.md").read_text()
    for group, methods in (("iwslt", gpu.PRESETS["tiny"]["iwslt_methods"]), ("depth", gpu.PRESETS["tiny"]["depth_methods"])):
        saved = json.loads((results / f"gpu-tiny-{group}.json").read_text())["runs"]
        assert [r["method"] for r in saved] == list(methods)
        assert all(r["status"] == "done" and r["bleu"]["signature"].startswith("nrefs:1") for r in saved)
    log = (out / "runs" / "iwslt" / "vanilla-seed1" / "train.log").read_text()
    stop = re.search(r"'stop_time_hours': ([0-9.]+)", log)
    assert stop and 0 < float(stop.group(1)) < 10 / 60  # the budget became fairseq's own stop time
    import tarfile

    with tarfile.open(tmp_path / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert "runs/iwslt/gradinit-seed1/train.log" in names and not [n for n in names if n.endswith(".pt")]


def test_constraint_sweep_runs_each_part_as_its_stability_command(tmp_path):
    # A stand-in for python records the bench/stability.py command lines of each part.
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {calls}\n'
        'while [ $# -gt 0 ]; do [ "$1" = --out ] && mkdir -p "$2" && echo table > "$2/results.md"; shift; done\n'
    )
    fake.chmod(0o755)
    script = str(ROOT / "bench" / "constraint_sweep.sh")
    env = {**os.environ, "PYTHON": str(fake)}
    proc = subprocess.run(["bash", script, str(tmp_path / "out"), "5", "lr2e-3", "paper"],
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lr2, paper = calls.read_text().splitlines()
    assert "--lr 2e-3 --seeds 3 --jobs 5 --methods vanilla,warmup,gradinit,gradinit-g480" in lr2
    assert "--variant g480=--gradinit-gamma 480" in lr2
    assert "--lr 1e-3" in paper and "--gradinit-iters 780 --gradinit-lr 2.5e-3" in paper

    proc = subprocess.run(["bash", script, str(tmp_path / "out"), "5", "bogus"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["bench/constraint_sweep.sh: unknown part 'bogus' (short, lr2e-3 or paper)"]
