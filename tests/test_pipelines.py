"""The plugin in pipelines people already have (issue 13): every task, any directory,
fairseq-hydra-train, tasks of the user's own, and flag combinations fairseq cannot run."""
import importlib.util
import os
import re
import subprocess

import pytest
import torch

from conftest import (
    BIN, MULTI30K, PLUGIN, ROOT, TINY_ARCH, USER_COMMAND, fairseq, installed_user_dir, read_json, train,
)  # fmt: skip

SHORT_RUN = ["--cpu", "--no-progress-bar", "--log-format", "simple", "--max-update", "2",
             "--gradinit-iters", "4", "--seed", "1"]  # fmt: skip


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def trained(log, updates):
    """fairseq's log says training reached ``updates`` updates."""
    return re.search(rf"num_updates[=: ]+{updates}\b", log) is not None


def one_line_error(proc):
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.official
def test_every_registered_task_has_the_gradinit_flags():
    from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY

    from fairseq_gradinit.hook import GradInitTaskMixin

    assert {"translation", "translation_multi_simple_epoch", "language_modeling", "masked_lm"} <= set(TASK_REGISTRY)
    for name, task in TASK_REGISTRY.items():
        assert issubclass(task, GradInitTaskMixin), name
        if name in TASK_DATACLASS_REGISTRY:
            assert "gradinit_iters" in TASK_DATACLASS_REGISTRY[name].__dataclass_fields__, name
    assert TASK_REGISTRY["translation_gradinit"] is TASK_REGISTRY["translation"]


# --- translation_multi_simple_epoch on real multilingual binarization --------------------


@pytest.fixture(scope="module")
def multilingual_bin(tmp_path_factory):
    """de-en and en-de from a 300-sentence slice of Multi30k, one fairseq-preprocess per pair
    with one shared dictionary, as multilingual recipes binarize."""
    work = tmp_path_factory.mktemp("multi")
    raw = work / "raw"
    raw.mkdir()
    for split, source, n in (("train", "train", 300), ("valid", "val", 30)):
        for lang in ("de", "en"):
            with open(os.path.join(MULTI30K, f"{source}.{lang}"), encoding="utf-8") as f:
                lines = [next(f).lower() for _ in range(n)]
            (raw / f"{split}.{lang}").write_text("".join(lines), encoding="utf-8")
    dest = work / "data-bin"
    common = ["--trainpref", raw / "train", "--validpref", raw / "valid", "--destdir", dest, "--workers", "1"]
    ok(fairseq("fairseq-preprocess", "--source-lang", "de", "--target-lang", "en", "--joined-dictionary", *common))
    ok(fairseq("fairseq-preprocess", "--source-lang", "en", "--target-lang", "de",
               "--srcdict", dest / "dict.en.txt", "--tgtdict", dest / "dict.de.txt", *common))  # fmt: skip
    return str(dest)


MULTILINGUAL = ["--lang-pairs", "de-en,en-de", "--langs", "de,en", "--encoder-langtok", "src",
                "--decoder-langtok", "--arch", "transformer", *TINY_ARCH, "--share-all-embeddings",
                "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
                "--optimizer", "adam", "--lr", "5e-4", "--lr-scheduler", "fixed",
                "--max-tokens", "1024"]  # fmt: skip


@pytest.mark.official
def test_translation_multi_simple_epoch_runs_gradinit_on_both_language_pairs(multilingual_bin, tmp_path):
    log = ok(fairseq("fairseq-train", multilingual_bin, "--user-dir", PLUGIN, "--gradinit",
                     "--task", "translation_multi_simple_epoch", *MULTILINGUAL, *SHORT_RUN,
                     "--save-dir", tmp_path / "ck"))  # fmt: skip
    assert "GradInit done" in log and trained(log, 2)
    payload = read_json(tmp_path / "ck" / "gradinit_scales.json")
    assert payload["iterations"] == 4 and "encoder.layers.0.fc1.weight" in payload["scales"]


def test_batches_that_are_not_one_tensor_row_per_sample_are_not_splittable():
    from fairseq_gradinit.fairseq_batches import splittable

    row = {"net_input": {"src_tokens": torch.ones(3, 4)}, "target": torch.ones(3, 4)}
    assert splittable(row)
    assert not splittable({"de-en": row, "en-de": row})  # multilingual_translation's batches
    assert not splittable({"net_input": {}, "target": None})


def test_a_task_whose_batches_cannot_be_split_is_named_in_a_one_line_error(multilingual_bin, tmp_path):
    # multilingual_translation batches are {language pair: batch}: no S and S~ to cut.
    drop = {"--encoder-langtok", "src", "--decoder-langtok", "--langs", "de,en"}
    args = [a for a in MULTILINGUAL if a not in drop]
    proc = fairseq("fairseq-train", multilingual_bin, "--user-dir", PLUGIN, "--gradinit",
                   "--task", "multilingual_translation", *args, "--arch", "multilingual_transformer",
                   *SHORT_RUN, "--save-dir", tmp_path / "ck")  # fmt: skip
    line = one_line_error(proc)
    # Its model (one Transformer per language pair) is refused before any batch is drawn.
    assert "--task multilingual_translation" in line and "not a model family" in line, line
    assert not (tmp_path / "ck" / "gradinit_scales.json").exists()


# --- language_modeling and masked_lm -------------------------------------------------------


@pytest.fixture(scope="module")
def monolingual_bin(data_bin, tmp_path_factory):
    raw = os.path.join(os.path.dirname(os.path.dirname(data_bin)), "raw")
    dest = tmp_path_factory.mktemp("lm") / "data-bin"
    ok(fairseq("fairseq-preprocess", "--only-source", "--trainpref", os.path.join(raw, "train.en"),
               "--validpref", os.path.join(raw, "valid.en"), "--destdir", dest, "--workers", "1"))  # fmt: skip
    return str(dest)


def test_masked_lm_task_takes_gradinit(monolingual_bin, tmp_path):
    log = ok(fairseq(
        "fairseq-train", monolingual_bin, "--user-dir", PLUGIN, "--gradinit", "--task", "masked_lm",
        "--criterion", "masked_lm", "--arch", "roberta_base", "--encoder-layers", "1",
        "--encoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2",
        "--tokens-per-sample", "32", "--sample-break-mode", "complete", "--optimizer", "adam",
        "--lr", "1e-3", "--lr-scheduler", "fixed", "--max-tokens", "512", *SHORT_RUN,
        "--save-dir", tmp_path / "ck",
    ))  # fmt: skip
    assert "GradInit done" in log and trained(log, 2)
    assert "encoder.sentence_encoder.layers.0.fc1.weight" in read_json(tmp_path / "ck" / "gradinit_scales.json")["scales"]


# --- a task of the user's own --------------------------------------------------------------

USER_TASKS = '''
from dataclasses import dataclass, field

from fairseq.tasks.translation import TranslationConfig, TranslationTask
from fairseq.tasks.translation_multi_simple_epoch import TranslationMultiSimpleEpochTask


@dataclass
class MyConfig(TranslationConfig):
    my_flag: int = field(default=3, metadata={"help": "a flag of the user's task"})


def register():
    from fairseq.tasks import register_task

    @register_task("my_translation", dataclass=MyConfig)
    class MyTranslationTask(TranslationTask):
        def train_step(self, sample, *args, **kwargs):
            assert self.cfg.my_flag == 5  # the user's own flag still arrives
            return super().train_step(sample, *args, **kwargs)

    @register_task("my_multilingual")  # a legacy task: flags from add_args
    class MyMultilingualTask(TranslationMultiSimpleEpochTask):
        pass
'''


@pytest.fixture(params=["before", "after"])
def user_dir(request, tmp_path):
    """A --user-dir of the user's own that registers its tasks before or after importing the plugin."""
    package = tmp_path / f"my_plugin_{request.param}"
    package.mkdir()
    (package / "tasks_of_mine.py").write_text(USER_TASKS)
    order = ["from .tasks_of_mine import register; register()", "import fairseq_gradinit"]
    if request.param == "after":
        order.reverse()
    (package / "__init__.py").write_text("\n".join(order) + "\n")
    return package


@pytest.mark.official
def test_a_task_the_user_registers_before_or_after_the_plugin_takes_gradinit(user_dir, data_bin, tmp_path):
    command = [a for a in USER_COMMAND]
    command[command.index(PLUGIN)] = str(user_dir)
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = ok(fairseq("fairseq-train", data_bin, *command, *TINY_ARCH, "--task", "my_translation",
                     "--my-flag", "5", *SHORT_RUN, "--save-dir", tmp_path / "ck", env=env))  # fmt: skip
    assert "GradInit done" in log and trained(log, 2)


def test_a_legacy_task_the_user_registers_takes_gradinit(multilingual_bin, tmp_path):
    package = tmp_path / "my_plugin"
    package.mkdir()
    (package / "__init__.py").write_text("import fairseq_gradinit\n" + USER_TASKS + "\nregister()\n")
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = ok(fairseq("fairseq-train", multilingual_bin, "--user-dir", package, "--gradinit",
                     "--task", "my_multilingual", *MULTILINGUAL, *SHORT_RUN, "--save-dir", tmp_path / "ck",
                     env=env))  # fmt: skip
    assert "GradInit done" in log


# --- --user-dir of an installed plugin, from any directory ---------------------------------


@pytest.mark.official
def test_user_dir_by_name_finds_the_installed_plugin_from_any_directory(data_bin, tmp_path):
    installed = installed_user_dir()
    if installed is None:
        pytest.skip("the plugin is not installed beside fairseq here: run `make install` (or make test)")
    command = [a for a in USER_COMMAND]
    command[command.index(PLUGIN)] = "fairseq_gradinit"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)  # the installed copy, not this checkout on the path
    proc = subprocess.run(
        [str(BIN / "fairseq-train"), data_bin, *command, *TINY_ARCH, *SHORT_RUN, "--save-dir", str(tmp_path / "ck")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert "GradInit done" in ok(proc)


# --- fairseq-hydra-train -------------------------------------------------------------------


@pytest.mark.official
def test_hydra_train_with_the_example_config_runs_gradinit_on_the_translation_task(data_bin, tmp_path):
    from omegaconf import OmegaConf

    # The shipped config with a tiny model and a short run (a YAML, so that no override
    # needs hydra's version-dependent "+key=" syntax for keys the config does not name).
    config = OmegaConf.load(ROOT / "examples" / "hydra" / "gradinit_translation.yaml")
    assert config.task._name == "translation" and config.task.gradinit is True
    assert config.common.user_dir == "fairseq_gradinit"
    tiny = {"layers": 1, "embed_dim": 16, "ffn_embed_dim": 32, "attention_heads": 2}
    config.model.encoder, config.model.decoder = dict(tiny), dict(tiny)
    config.task.data, config.task.gradinit_iters = data_bin, 4
    config.common.user_dir, config.common.cpu, config.common.seed = PLUGIN, True, 1
    config.optimization.max_update = 2
    config.checkpoint = {"save_dir": str(tmp_path / "ck")}
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "tiny.yaml").write_text("# @package _group_\n" + OmegaConf.to_yaml(config))
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = ok(fairseq("fairseq-hydra-train", "--config-dir", tmp_path / "conf", "--config-name", "tiny",
                     f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path, env=env))  # fmt: skip
    assert "GradInit done" in log and trained(log, 2)
    assert "encoder.layers.0.fc1.weight" in read_json(tmp_path / "ck" / "gradinit_scales.json")["scales"]
    assert read_json(tmp_path / "ck" / "gradinit_scales.json")["settings"]["eta"] == 5e-4
    model = torch.load(tmp_path / "ck" / "checkpoint_last.pt", map_location="cpu", weights_only=False)["model"]
    assert model["encoder.layers.0.fc1.weight"].shape == (32, 16)  # the tiny model was built


@pytest.mark.official
def test_the_hydra_plugin_leaves_fairseq_train_alone_without_user_dir(data_bin):
    # fairseq-train composes its config with hydra too, which imports hydra_plugins/.
    script = (
        "import sys; from fairseq import options; "
        "from fairseq.dataclass.utils import convert_namespace_to_omegaconf as c; "
        f"c(options.parse_args_and_arch(options.get_training_parser(), [{data_bin!r}, '--arch', 'transformer']));"
        "print('loaded' if 'fairseq_gradinit' in sys.modules else 'not loaded')"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # hydra_plugins/ of this checkout is on the path
    proc = subprocess.run([str(BIN / "python"), "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    ok(proc)
    assert proc.stdout.strip().splitlines()[-1] == "not loaded"


# --- flag combinations fairseq itself cannot run -------------------------------------------


@pytest.mark.official
@pytest.mark.parametrize("flag", ["--fp16", "--memory-efficient-fp16"])
def test_fp16_on_cpu_is_a_one_line_error(data_bin, tmp_path, flag):
    line = one_line_error(train(data_bin, tmp_path / "ck", flag))  # train() passes --cpu
    assert f"{flag} needs a CUDA GPU (--cpu is set)" in line, line


@pytest.mark.official
@pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch_xla is installed")
@pytest.mark.parametrize("flag", ["--bf16", "--memory-efficient-bf16"])
def test_bf16_without_torch_xla_is_a_one_line_error(data_bin, tmp_path, flag):
    line = one_line_error(train(data_bin, tmp_path / "ck", flag))
    assert f"{flag} means training on a TPU in fairseq 0.12" in line and "torch_xla" in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fp16_without_cuda_is_a_one_line_error_even_without_cpu_flag(data_bin, tmp_path):
    proc = fairseq("fairseq-train", data_bin, *USER_COMMAND, *TINY_ARCH, "--fp16", "--save-dir", tmp_path / "ck")
    assert "--fp16 needs a CUDA GPU (no CUDA device is available)" in one_line_error(proc)


def test_half_precision_is_refused_without_gradinit_too(data_bin, tmp_path):
    command = [a for a in USER_COMMAND if a != "--gradinit"]
    proc = fairseq("fairseq-train", data_bin, *command, *TINY_ARCH, "--cpu", "--fp16", "--save-dir", tmp_path / "ck")
    assert "--fp16 needs a CUDA GPU" in one_line_error(proc)

