"""The plugin from stock fairseq-train: the user's command, resume, --gradinit-only, bad input."""
import json
import math
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from conftest import BIN, PLUGIN, TINY_ARCH, USER_COMMAND, fairseq, official_fairseq, read_json, train


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def model_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def runs(data_bin, tmp_path_factory):
    """Three GradInit runs shared by several tests: default task, explicit task, other seed."""
    root = tmp_path_factory.mktemp("runs")
    logs = {
        "default": ok(train(data_bin, root / "default", "--gradinit-iters", "20")),
        "explicit": ok(train(data_bin, root / "explicit", "--gradinit-iters", "20", "--task", "translation_gradinit")),
        "seed8": ok(train(data_bin, root / "seed8", "--gradinit-iters", "20", "--seed", "8", "--max-update", "1")),
    }  # fmt: skip
    return root, logs


@pytest.mark.official
def test_users_literal_command_runs_gradinit_then_trains(runs):
    root, logs = runs
    assert "GradInit done" in logs["default"] and "num_updates=4" in logs["default"]
    payload = read_json(root / "default" / "gradinit_scales.json")
    assert payload["iterations"] == 20
    assert payload["settings"]["target"] == "adam" and payload["settings"]["eta"] == 5e-4
    assert payload["settings"]["max_tokens"] == 4096  # --max-tokens
    assert "encoder.layers.0.fc1.weight" in payload["scales"]
    # Shared decoder input/output embedding: one scale, under its first name.
    assert "decoder.embed_tokens.weight" in payload["scales"]
    assert "decoder.output_projection.weight" not in payload["scales"]
    last = model_state(root / "default" / "checkpoint_last.pt")
    assert last["task_state"]["gradinit"]["scales"] == payload["scales"]


def test_log_line_every_ten_iterations_names_branch_losses_norm_and_scales(runs):
    _, logs = runs
    # Iterations 10 and 20, each once: no repeat of the last one at the end.
    lines = [l for l in logs["default"].splitlines() if "| gradinit |" in l]
    assert len(lines) == 2 and all(" / 20 " in l for l in lines), lines
    for word in ("branch=", "loss_S=", "loss_S~=", "gnorm=", "scale_min=", "scale_mean=", "scale_max="):
        assert word in lines[0], lines[0]


@pytest.mark.official
def test_explicit_task_behaves_like_the_default_translation_task(runs):
    root, _ = runs
    a = read_json(root / "default" / "gradinit_scales.json")
    b = read_json(root / "explicit" / "gradinit_scales.json")
    assert a["scales"] == b["scales"]


def test_same_seed_gives_identical_scales_and_another_seed_differs(runs):
    root, _ = runs
    a, b, c = (read_json(root / x / "gradinit_scales.json")["scales"] for x in ("default", "explicit", "seed8"))
    assert a == b and a != c


@pytest.mark.official
def test_without_gradinit_the_plugin_changes_nothing_about_training(data_bin, tmp_path):
    base = [data_bin, *[a for a in USER_COMMAND if a not in ("--user-dir", PLUGIN, "--gradinit")],
            *TINY_ARCH, "--cpu", "--max-update", "3", "--seed", "3", "--no-progress-bar"]  # fmt: skip
    ok(fairseq("fairseq-train", *base, "--save-dir", tmp_path / "stock"))
    ok(fairseq("fairseq-train", *base, "--save-dir", tmp_path / "plugin", "--user-dir", PLUGIN))
    stock = model_state(tmp_path / "stock" / "checkpoint_last.pt")["model"]
    plugin = model_state(tmp_path / "plugin" / "checkpoint_last.pt")["model"]
    assert stock.keys() == plugin.keys()
    # Official fairseq 0.12.2's positional embeddings keep an uninitialized one-element
    # buffer (_float_tensor) in the state dict: it differs between two stock runs too.
    weights = [k for k in stock if not k.endswith("._float_tensor")]
    assert all(torch.equal(stock[k], plugin[k]) for k in weights)
    assert not (tmp_path / "plugin" / "gradinit_scales.json").exists()


@pytest.mark.official
def test_resume_from_checkpoint_does_not_run_gradinit_again_and_keeps_the_scales(data_bin, runs, tmp_path):
    root, logs = runs
    assert logs["default"].count("GradInit done") == 1
    shutil.copytree(root / "default", tmp_path / "ck")
    scales = read_json(tmp_path / "ck" / "gradinit_scales.json")["scales"]
    again = ok(train(data_bin, tmp_path / "ck", "--gradinit-iters", "20", "--max-update", "6"))
    assert "GradInit done" not in again and "GradInit not run" in again
    assert "num_updates=6" in again
    last = model_state(tmp_path / "ck" / "checkpoint_last.pt")
    assert last["optimizer_history"][-1]["num_updates"] == 6
    assert last["task_state"]["gradinit"]["scales"] == scales


def test_update_freq_runs_gradinit_once(data_bin, tmp_path):
    log = ok(train(data_bin, tmp_path / "ck", "--update-freq", "3", "--max-update", "2"))
    assert log.count("GradInit done") == 1


def _initial_model(data_bin, seed):
    """The model fairseq-train builds before any update, from the same seed."""
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, [data_bin, *USER_COMMAND, *TINY_ARCH, "--cpu", "--seed", str(seed)]
    )
    cfg = convert_namespace_to_omegaconf(args)
    utils.set_torch_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    return task.build_model(cfg.model)


@pytest.fixture(scope="module")
def gradinit_only(data_bin, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("gradinit_only")
    return save_dir, ok(train(data_bin, save_dir, "--gradinit-only"))


@pytest.mark.official
def test_gradinit_only_writes_a_checkpoint_of_scaled_weights_that_stock_fairseq_trains_from(data_bin, gradinit_only, tmp_path):
    save_dir, log = gradinit_only
    assert "--gradinit-only" in log and "num_updates=" not in log
    ckpt = save_dir / "checkpoint_gradinit.pt"
    assert ckpt.exists() and not (save_dir / "checkpoint_last.pt").exists()
    scales = read_json(save_dir / "gradinit_scales.json")["scales"]
    weights = model_state(ckpt)["model"]
    init = dict(_initial_model(data_bin, seed=7).named_parameters())
    for name, scale in scales.items():
        expected = init[name].detach() * torch.tensor(scale, dtype=torch.float32)
        assert torch.equal(weights[name], expected), name
    # Stock fairseq (no plugin, no --gradinit) starts from it.
    stock = [data_bin, *[a for a in USER_COMMAND if a not in ("--user-dir", PLUGIN, "--gradinit")],
             *TINY_ARCH, "--cpu", "--max-update", "2", "--no-progress-bar",
             "--save-dir", tmp_path / "stock", "--restore-file", ckpt, "--reset-optimizer",
             "--reset-lr-scheduler", "--reset-dataloader", "--reset-meters"]  # fmt: skip
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}  # stock fairseq on torch >= 2.6, see README
    log = ok(fairseq("fairseq-train", *stock, env=env))
    assert "num_updates=2" in log or "num_updates 2" in log


@pytest.mark.official
def test_restoring_the_gradinit_checkpoint_with_the_plugin_does_not_run_gradinit_again(data_bin, gradinit_only, tmp_path):
    save_dir, _ = gradinit_only
    log = ok(train(data_bin, tmp_path / "ck", "--restore-file", save_dir / "checkpoint_gradinit.pt",
                   "--reset-optimizer", "--reset-lr-scheduler", "--reset-dataloader", "--reset-meters"))  # fmt: skip
    assert "GradInit done" not in log and "GradInit not run" in log


@pytest.mark.skipif(
    official_fairseq(),
    reason="official fairseq 0.12.2's own fairseq-generate fails on torch 2.x with or without "
    "the plugin ('Mask Type should be defined', its fused encoder path)",
)
def test_generate_decodes_a_gradinit_checkpoint(data_bin, runs):
    root, _ = runs
    log = ok(fairseq("fairseq-generate", data_bin, "--user-dir", PLUGIN, "--path",
                     root / "default" / "checkpoint_last.pt", "--beam", "2", "--max-len-b", "5",
                     "--cpu", "--batch-size", "16"))  # fmt: skip
    assert "Generate test with beam=2" in log


def _setup_task(data_bin, *flags, command=USER_COMMAND):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(
        options.get_training_parser(), [data_bin, *command, *TINY_ARCH, "--cpu", *flags]
    )
    return tasks.setup_task(convert_namespace_to_omegaconf(args).task)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gradinit-iters", "-5"], "--gradinit-iters"),
        (["--gradinit-gamma", "0"], "--gradinit-gamma"),
        (["--gradinit-gamma", "-1"], "--gradinit-gamma"),
        (["--gradinit-eta", "0"], "--gradinit-eta"),
        (["--gradinit-lr", "-0.1"], "--gradinit-lr"),
        (["--gradinit-min-scale", "0.5", "--gradinit-max-scale", "0.1"], "--gradinit-max-scale"),
        (["--gradinit-overlap", "1"], "--gradinit-overlap"),
        (["--gradinit-overlap", "-0.5"], "--gradinit-overlap"),
        (["--gradinit-betas", "(0.9)"], "--gradinit-betas"),
        (["--gradinit-max-tokens", "1"], "--gradinit-max-tokens"),
        (["--gradinit-gamma-factor", "0"], "--gradinit-gamma-factor must be"),
        (["--gradinit-gamma-factor", "0.04", "--gradinit-gamma", "1000"], "--gradinit-gamma-factor: cannot be given together with --gradinit-gamma"),
        (["--gradinit-hvp-chunks", "0"], "--gradinit-hvp-chunks"),
    ],
)
def test_bad_flag_values_are_refused_at_setup_naming_the_flag(data_bin, flags, message):
    with pytest.raises(SystemExit) as e:
        _setup_task(data_bin, *flags)
    assert message in str(e.value)


def test_gamma_is_absolute_with_gradinit_gamma_and_relative_with_gradinit_gamma_factor(data_bin):
    from fairseq_gradinit.config import ADAM_GAMMA_FACTOR, settings_from_config

    relative = settings_from_config(_setup_task(data_bin, "--gradinit-gamma-factor", "0.04").cfg)
    assert (relative.gamma, relative.gamma_factor) == (math.inf, 0.04)
    absolute = settings_from_config(_setup_task(data_bin, "--gradinit-gamma", "1000").cfg)
    assert (absolute.gamma, absolute.gamma_factor) == (1000.0, None)
    default = settings_from_config(_setup_task(data_bin).cfg)
    assert (default.gamma_factor, default.second_order) == (ADAM_GAMMA_FACTOR, "hvp")


def test_an_optimizer_of_unknown_first_step_asks_for_gradinit_optimizer(data_bin):
    command = [a for a in USER_COMMAND if a not in ("--adam-betas", "(0.9,0.98)")]
    command[command.index("adam")] = "adagrad"
    with pytest.raises(SystemExit, match="say --gradinit-optimizer adam or --gradinit-optimizer sgd"):
        _setup_task(data_bin, command=command)
    assert _setup_task(data_bin, "--gradinit-optimizer", "sgd", command=command) is not None


@pytest.mark.official
def test_a_bad_flag_ends_fairseq_train_with_one_line_and_no_traceback(data_bin, tmp_path):
    proc = train(data_bin, tmp_path / "ck", "--gradinit-iters", "0")
    assert proc.returncode != 0
    assert "--gradinit-iters must be an integer >= 1 (got 0)" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "ck" / "gradinit_scales.json")


def test_gradinit_batch_too_small_to_split_is_a_clear_error(data_bin, tmp_path):
    proc = train(data_bin, tmp_path / "ck", "--gradinit-max-tokens", "3")
    assert proc.returncode != 0
    assert "--gradinit-max-tokens" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "ck" / "checkpoint_last.pt")


def test_inverse_sqrt_without_warmup_points_at_a_schedule_that_works(data_bin, tmp_path):
    command = [a for a in USER_COMMAND if a not in ("--power", "1", "--total-num-update", "100000")]
    command[command.index("polynomial_decay")] = "inverse_sqrt"
    proc = fairseq("fairseq-train", data_bin, *command, *TINY_ARCH, "--cpu", "--save-dir", tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--lr-scheduler polynomial_decay --power 1" in proc.stderr and "fixed" in proc.stderr


def test_gradinit_load_applies_saved_scales_to_a_fresh_model_of_the_same_seed(data_bin, gradinit_only, tmp_path):
    save_dir, _ = gradinit_only
    log = ok(train(data_bin, tmp_path / "ck", "--gradinit-load", save_dir / "gradinit_scales.json", "--gradinit-only"))
    assert "applied" in log and "GradInit done" not in log
    learned = model_state(save_dir / "checkpoint_gradinit.pt")["model"]
    loaded = model_state(tmp_path / "ck" / "checkpoint_gradinit.pt")["model"]
    assert all(torch.equal(learned[k], loaded[k]) for k in learned)


@pytest.mark.parametrize("damage", ["rename", "reshape"])
def test_gradinit_load_refuses_a_json_of_another_model(data_bin, gradinit_only, tmp_path, damage):
    save_dir, _ = gradinit_only
    payload = read_json(save_dir / "gradinit_scales.json")
    name = "encoder.layers.0.fc1.weight"
    if damage == "rename":
        payload["scales"]["encoder.layers.7.fc1.weight"] = payload["scales"].pop(name)
    else:
        payload["shapes"][name] = [3, 3]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(payload))
    proc = train(data_bin, tmp_path / "ck", "--gradinit-load", bad)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--gradinit-load" in proc.stderr and "does not fit this model" in proc.stderr
    assert ("encoder.layers.7" if damage == "rename" else "other shape") in proc.stderr


def test_gradinit_load_of_a_missing_file_is_refused_at_setup(data_bin, tmp_path):
    with pytest.raises(SystemExit, match="--gradinit-load: cannot read"):
        _setup_task(data_bin, "--gradinit-load", str(tmp_path / "none.json"))


@pytest.mark.official
def test_language_modeling_task_takes_gradinit_too(data_bin, tmp_path):
    raw = os.path.join(os.path.dirname(os.path.dirname(data_bin)), "raw")
    lm_bin = tmp_path / "lm-bin"
    ok(fairseq("fairseq-preprocess", "--only-source", "--trainpref", os.path.join(raw, "train.en"),
               "--validpref", os.path.join(raw, "valid.en"), "--destdir", lm_bin))  # fmt: skip
    log = ok(fairseq(
        "fairseq-train", lm_bin, "--user-dir", PLUGIN, "--gradinit", "--gradinit-iters", "5",
        "--task", "language_modeling", "--arch", "transformer_lm", "--decoder-layers", "1",
        "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2",
        "--tokens-per-sample", "32", "--optimizer", "adam", "--lr", "1e-3",
        "--lr-scheduler", "fixed", "--max-tokens", "512", "--max-update", "2", "--cpu",
        "--save-dir", tmp_path / "ck", "--no-progress-bar",
    ))  # fmt: skip
    assert "GradInit done" in log
    scales = read_json(tmp_path / "ck" / "gradinit_scales.json")["scales"]
    assert "decoder.layers.0.fc1.weight" in scales


def test_two_workers_end_gradinit_with_identical_scales_and_weights(data_bin, tmp_path):
    port = 20000 + os.getpid() % 20000
    procs = [
        subprocess.Popen(
            [str(BIN / "fairseq-train"), data_bin, *USER_COMMAND, *TINY_ARCH, "--cpu",
             "--gradinit-iters", "4", "--max-update", "2", "--save-dir", str(tmp_path / "ck"),
             "--no-progress-bar", "--distributed-world-size", "2", "--distributed-rank", str(rank),
             "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
             "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, log in zip(procs, logs):  # a worker that disagreed would have failed
        assert proc.returncode == 0, log[-3000:]
    # fairseq logs INFO on the first worker only.
    assert logs[0].count("GradInit done") == 1
    assert "scales and weights identical on all 2 workers" in logs[0]
    assert read_json(tmp_path / "ck" / "gradinit_scales.json")["iterations"] == 4


def test_share_all_embeddings_gets_one_scale_and_trains_after_gradinit(data_bin, tmp_path):
    log = ok(train(data_bin, tmp_path / "ck", "--share-all-embeddings", "--max-update", "2"))
    assert "num_updates=2" in log
    scales = read_json(tmp_path / "ck" / "gradinit_scales.json")["scales"]
    assert "encoder.embed_tokens.weight" in scales
    assert not any(n.startswith("decoder.embed_tokens") or "output_projection" in n for n in scales)


def test_one_sentence_per_batch_is_too_small_to_split_and_says_so(data_bin, tmp_path):
    proc = train(data_bin, tmp_path / "ck", "--batch-size", "1")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert "a batch of 1 samples is too small to split" in message
    assert "1 sentences (--batch-size)" in message and "at least 3 sentences" in message


def test_stopping_during_gradinit_leaves_no_checkpoint_or_scales(data_bin, tmp_path):
    save_dir = tmp_path / "ck"
    args = [data_bin, *USER_COMMAND, *TINY_ARCH, "--cpu", "--gradinit-iters", "100000",
            "--gradinit-only", "--save-dir", save_dir, "--no-progress-bar"]  # fmt: skip
    # SIGINT at its default: a shell running pytest in the background ignores it, and
    # children inherit that (the test must check the plugin, not the caller's shell).
    proc = subprocess.Popen([str(BIN / "fairseq-train"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    for line in proc.stdout:
        if "GradInit: " in line:  # GradInit has started
            break
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=120)
    finally:  # an interrupt that was not honoured must not leave GradInit running
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    leftovers = sorted(p.name for p in save_dir.iterdir()) if save_dir.exists() else []
    assert not [n for n in leftovers if n.endswith(".pt") or n.endswith(".json")], leftovers
