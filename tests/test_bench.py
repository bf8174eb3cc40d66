"""bench/stability.py: the no-warmup comparison runs end to end and reports what it measured."""
import json
import math
import os
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


def test_cost_bench_prints_every_ratio_with_its_target(data_bin):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cost.py"), "--data", data_bin, "--models", "tiny",
         "--max-tokens", "256", "--repeats", "1", "--warmup", "0"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| tiny |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 10
    ratios = cells[3:9]
    assert all(c.endswith(" ok") or "MISSES" in c for c in ratios), row
    assert all(float(c.split("x")[0]) > 0 for c in ratios)
    assert cells[9].endswith("%")
    last = proc.stdout.strip().splitlines()[-2:]
    assert last[0].startswith("command: ") and last[1].startswith("machine: ") and "; date: " in last[1], last
