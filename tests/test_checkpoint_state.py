"""The scales live with the weights: resume, restore, fine-tune, two-stage flow, full disks,
failures inside the training loop and --gradinit-load's values (issue 14, rows 1-9, 13)."""
import json
import os
import resource
import shutil
import signal
import subprocess

import pytest
import torch

from conftest import BIN, TINY_ARCH, USER_COMMAND, read_json, train

RESET = ["--reset-optimizer", "--reset-lr-scheduler", "--reset-dataloader", "--reset-meters"]


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def one_line_failure(proc, code=1):
    """A clean exit with ``code``, the plugin's one line last on stderr, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "terminate called" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fairseq-gradinit: error: "), last
    return last


def task_scales(path):
    state = torch.load(path, map_location="cpu", weights_only=False)
    return (state["task_state"].get("gradinit") or {}).get("scales")


@pytest.fixture(scope="module")
def run(data_bin, tmp_path_factory):
    """A GradInit run that trained 2 updates: checkpoint_last/best.pt and the JSON."""
    save_dir = tmp_path_factory.mktemp("state_run") / "ck"
    ok(train(data_bin, save_dir, "--max-update", "2"))
    return save_dir, read_json(save_dir / "gradinit_scales.json")["scales"]


@pytest.fixture(scope="module")
def gradinit_only(data_bin, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("state_only") / "ck"
    ok(train(data_bin, save_dir, "--gradinit-only"))
    return save_dir, read_json(save_dir / "gradinit_scales.json")["scales"]


def copy_run(run, tmp_path):
    save_dir, scales = run
    shutil.copytree(save_dir, tmp_path / "ck")
    return tmp_path / "ck", scales


def test_resume_without_the_json_keeps_the_checkpoints_scales_and_rewrites_the_json(data_bin, run, tmp_path):
    save_dir, scales = copy_run(run, tmp_path)
    os.remove(save_dir / "gradinit_scales.json")
    log = ok(train(data_bin, save_dir, "--max-update", "4"))
    assert "GradInit done" not in log and "num_updates=4" in log
    assert task_scales(save_dir / "checkpoint_last.pt") == scales
    assert task_scales(save_dir / "checkpoint_best.pt") == scales
    assert read_json(save_dir / "gradinit_scales.json")["scales"] == scales


def test_restore_file_into_a_new_save_dir_carries_the_scales(data_bin, run, tmp_path):
    source, scales = run
    new = tmp_path / "new"
    log = ok(train(data_bin, new, "--restore-file", source / "checkpoint_last.pt", "--max-update", "4"))
    assert "GradInit done" not in log and "num_updates=4" in log
    assert task_scales(new / "checkpoint_last.pt") == scales
    assert read_json(new / "gradinit_scales.json")["scales"] == scales


def test_finetune_from_model_carries_the_scales(data_bin, run, tmp_path):
    source, scales = run
    new = tmp_path / "new"
    ok(train(data_bin, new, "--finetune-from-model", source / "checkpoint_last.pt", "--max-update", "2"))
    assert task_scales(new / "checkpoint_last.pt") == scales
    assert read_json(new / "gradinit_scales.json")["scales"] == scales


@pytest.mark.parametrize("flags", [[], ["--gradinit"]], ids=["plain", "with-gradinit"])
def test_two_stage_flow_second_stage_checkpoints_carry_the_first_stages_scales(data_bin, gradinit_only, tmp_path, flags):
    source, scales = gradinit_only
    command = [a for a in USER_COMMAND if a != "--gradinit"] + flags
    new = tmp_path / "stage2"
    args = [data_bin, *command, *TINY_ARCH, "--save-dir", new, "--cpu", "--no-progress-bar",
            "--max-update", "2", "--seed", "7", "--restore-file", source / "checkpoint_gradinit.pt", *RESET]  # fmt: skip
    proc = subprocess.run([str(BIN / "fairseq-train"), *map(str, args)], capture_output=True, text=True, timeout=600)
    log = ok(proc)
    assert "GradInit done" not in log and "holds no GradInit scales" not in log
    assert task_scales(new / "checkpoint_last.pt") == scales
    assert read_json(new / "gradinit_scales.json")["scales"] == scales


def test_resume_with_another_runs_json_keeps_the_checkpoints_scales_and_says_so(data_bin, run, tmp_path):
    save_dir, scales = copy_run(run, tmp_path)
    other = {name: scale * 0.5 for name, scale in scales.items()}
    (save_dir / "gradinit_scales.json").write_text(json.dumps({"scales": other}))
    proc = train(data_bin, save_dir, "--max-update", "4")
    log = ok(proc)
    assert task_scales(save_dir / "checkpoint_last.pt") == scales
    assert read_json(save_dir / "gradinit_scales.json")["scales"] == scales
    warnings = [l for l in log.splitlines() if "gradinit_scales.json holds other scales" in l]
    assert len(warnings) == 1 and "rewritten from the checkpoint" in warnings[0]


def test_resume_with_a_truncated_json_rewrites_it_and_does_not_blame_gradinit_load(data_bin, run, tmp_path):
    save_dir, scales = copy_run(run, tmp_path)
    text = (save_dir / "gradinit_scales.json").read_text()
    (save_dir / "gradinit_scales.json").write_text(text[: len(text) // 2])
    proc = train(data_bin, save_dir, "--max-update", "4")
    log = ok(proc)
    assert "--gradinit-load" not in proc.stderr
    assert "gradinit_scales.json cannot be read" in log
    assert read_json(save_dir / "gradinit_scales.json")["scales"] == scales
    assert task_scales(save_dir / "checkpoint_last.pt") == scales


def test_gradinit_only_on_a_save_dir_with_checkpoints_refuses_and_touches_nothing(data_bin, run, tmp_path):
    save_dir, _ = copy_run(run, tmp_path)
    before = {p.name: p.read_bytes() for p in save_dir.iterdir()}
    proc = train(data_bin, save_dir, "--gradinit-only")
    last = one_line_failure(proc)
    assert "--gradinit-only" in last and "checkpoint_last.pt" in last
    assert {p.name: p.read_bytes() for p in save_dir.iterdir()} == before


def test_gradinit_only_with_a_restore_file_refuses(data_bin, run, tmp_path):
    source, _ = run
    proc = train(data_bin, tmp_path / "new", "--gradinit-only", "--restore-file", source / "checkpoint_last.pt")
    assert "--gradinit-only" in one_line_failure(proc)
    assert not (tmp_path / "new" / "checkpoint_gradinit.pt").exists()


def test_gradinit_load_of_another_architecture_exits_1_with_one_line_not_134(data_bin, gradinit_only, tmp_path):
    source, _ = gradinit_only
    payload = read_json(source / "gradinit_scales.json")
    payload["shapes"]["encoder.layers.0.fc1.weight"] = [3, 3]
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(payload))
    last = one_line_failure(train(data_bin, tmp_path / "ck", "--gradinit-load", bad))
    assert "--gradinit-load" in last and "does not fit this model" in last
    assert not (tmp_path / "ck" / "crash.pt").exists()


# ----- a full disk: RLIMIT_FSIZE makes every write past `limit` bytes fail (EFBIG) -----


def train_with_file_limit(data_bin, save_dir, limit, *extra):
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    # --num-workers 0: a data-loader worker hands batches over in /dev/shm files, which
    # the limit would break long before GradInit writes anything.
    args = [data_bin, *USER_COMMAND, *TINY_ARCH, "--save-dir", save_dir, "--cpu", "--no-progress-bar",
            "--max-update", "2", "--gradinit-iters", "6", "--seed", "7", "--num-workers", "0", *extra]  # fmt: skip
    return subprocess.run([str(BIN / "fairseq-train"), *map(str, args)], capture_output=True, text=True,
                          timeout=600, preexec_fn=limit_file_size)  # fmt: skip


def logged_scales(log):
    line = next(l for l in log.splitlines() if "GradInit scales (a --gradinit-load file): " in l)
    return json.loads(line.split("GradInit scales (a --gradinit-load file): ", 1)[1])["scales"]


def test_full_disk_while_writing_the_json_keeps_the_scales_in_the_log(data_bin, gradinit_only, tmp_path):
    save_dir = tmp_path / "ck"
    proc = train_with_file_limit(data_bin, save_dir, 1000)
    last = one_line_failure(proc)
    assert "cannot write" in last and "gradinit_scales.json" in last
    scales = logged_scales(proc.stdout + proc.stderr)
    assert scales == read_json(gradinit_only[0] / "gradinit_scales.json")["scales"]  # same seed, same scales
    assert sorted(p.name for p in save_dir.iterdir()) == []


def test_full_disk_while_writing_the_gradinit_checkpoint_leaves_no_tmp_or_crash_file(data_bin, tmp_path):
    save_dir = tmp_path / "ck"
    proc = train_with_file_limit(data_bin, save_dir, 20000, "--gradinit-only")
    last = one_line_failure(proc)
    assert "cannot write" in last and "checkpoint_gradinit.pt" in last
    assert sorted(p.name for p in save_dir.iterdir()) == ["gradinit_scales.json"]
    assert read_json(save_dir / "gradinit_scales.json")["scales"] == logged_scales(proc.stdout + proc.stderr)


def test_a_failing_write_removes_its_temporary_file(tmp_path, monkeypatch):
    import errno

    from fairseq_gradinit import state
    from fairseq_gradinit.core import GradInitError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", lambda obj, f, **kw: (f.write("{"), full()))
    with pytest.raises(GradInitError, match="cannot write .*s.json: No space left on device"):
        state.write_json(str(tmp_path / "s.json"), {"scales": {}})

    def partial(tmp):
        with open(tmp, "w") as f:
            f.write("x")
        full()

    with pytest.raises(GradInitError, match="cannot write .*c.pt: No space left on device"):
        state.write_atomically(str(tmp_path / "c.pt"), partial)
    assert list(tmp_path.iterdir()) == []


# ----- --gradinit-load values -----


def _setup_task(data_bin, *flags):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    command = [a for a in USER_COMMAND if a != "--gradinit"]
    args = options.parse_args_and_arch(options.get_training_parser(), [data_bin, *command, *TINY_ARCH, "--cpu", *flags])
    return tasks.setup_task(convert_namespace_to_omegaconf(args).task)


WEIGHT, BIAS = "encoder.layers.0.fc1.weight", "encoder.layers.0.fc1.bias"


@pytest.mark.parametrize(
    "name, text, words",
    [
        (WEIGHT, "-1", "weight scales must be >= 0.01"),
        (WEIGHT, "0", "weight scales must be >= 0.01"),
        (WEIGHT, "0.001", "weight scales must be >= 0.01"),
        (WEIGHT, "true", "not a finite number"),
        (WEIGHT, '"1"', "not a finite number"),
        (WEIGHT, "1e400", "not a finite number"),
        (WEIGHT, "1" + "0" * 400, "not a finite number"),
        (WEIGHT, "NaN", "not a finite number"),
        (BIAS, "-2", "bias scales must be >= 0"),
    ],
)
def test_gradinit_load_refuses_out_of_bounds_scales_at_setup(data_bin, gradinit_only, tmp_path, name, text, words):
    payload = read_json(gradinit_only[0] / "gradinit_scales.json")
    payload["scales"][name] = "@"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(payload).replace('"@"', text))
    with pytest.raises(SystemExit) as e:
        _setup_task(data_bin, "--gradinit-load", str(bad))
    message = str(e.value)
    assert message.startswith("fairseq-gradinit: error: --gradinit-load: ") and words in message, message
    assert name in message


@pytest.mark.parametrize("shapes", [5, [1, 2], {"x": 5}, {"x": [1.5]}])
def test_gradinit_load_refuses_shapes_that_are_not_a_mapping_of_sizes(data_bin, gradinit_only, tmp_path, shapes):
    payload = read_json(gradinit_only[0] / "gradinit_scales.json")
    payload["shapes"] = shapes
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(payload))
    with pytest.raises(SystemExit, match="--gradinit-load: .*'shapes' must map tensor names to lists of sizes"):
        _setup_task(data_bin, "--gradinit-load", str(bad))


def test_gradinit_load_refuses_a_scale_that_makes_weights_overflow(data_bin, gradinit_only, tmp_path):
    payload = read_json(gradinit_only[0] / "gradinit_scales.json")
    payload["scales"][WEIGHT] = 1e300
    bad = tmp_path / "big.json"
    bad.write_text(json.dumps(payload))
    last = one_line_failure(train(data_bin, tmp_path / "ck", "--gradinit-load", bad))
    assert "--gradinit-load" in last and "overflow" in last and WEIGHT in last
    assert not (tmp_path / "ck" / "checkpoint_last.pt").exists()


def test_gradinit_together_with_gradinit_load_says_in_one_line_that_the_load_replaces_gradinit(data_bin, gradinit_only, tmp_path):
    source, scales = gradinit_only
    proc = train(data_bin, tmp_path / "ck", "--gradinit-load", source / "gradinit_scales.json", "--gradinit-iters", "50")
    log = ok(proc)
    lines = [l for l in log.splitlines() if "replaces --gradinit" in l]
    assert len(lines) == 1 and "GradInit does not run" in lines[0], lines
    assert "GradInit done" not in log
    assert read_json(tmp_path / "ck" / "gradinit_scales.json")["scales"] == scales


def test_gradinit_only_without_gradinit_or_a_load_is_refused(data_bin):
    with pytest.raises(SystemExit, match="--gradinit-only needs --gradinit or --gradinit-load"):
        _setup_task(data_bin, "--gradinit-only")
