"""transformer_wskip*: LayerNorm(w_skip * x + f(x)), --wskip-init admin, GradInit on it."""
import math
import os

import pytest
import torch

from conftest import TINY_ARCH, USER_COMMAND, fairseq, read_json, train
from fairseq_gradinit.admin_init import admin_initialize
from fairseq_gradinit.hook import run_gradinit
from fairseq_gradinit.models import wskip_parameter_names


def build(data_bin, *flags, arch="transformer_wskip_iwslt_de_en", seed=1):
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(
        options.get_training_parser(),
        [data_bin, *USER_COMMAND, *TINY_ARCH, "--cpu", "--gradinit-iters", "3", *flags, "--arch", arch],
    )
    cfg = convert_namespace_to_omegaconf(args)
    utils.set_torch_seed(seed)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model = task.build_model(cfg.model)
    return cfg, task, model, task.build_criterion(cfg.criterion)


def a_sample(task, n=6):
    dataset = task.dataset("train")
    return dataset.collater([dataset[i] for i in range(n)])


def run(model, sample, seed=3):
    torch.manual_seed(seed)
    return model(**sample["net_input"])[0]


def test_all_ones_is_exactly_fairseqs_transformer(data_bin):
    _, task, plain, _ = build(data_bin, "--dropout", "0.3", "--attention-dropout", "0.1", arch="transformer_iwslt_de_en")
    _, _, wskip, _ = build(data_bin, "--dropout", "0.3", "--attention-dropout", "0.1", seed=2)
    missing, unexpected = wskip.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".w_skip_" in k for k in missing)
    assert len(wskip_parameter_names(wskip)) == 2 + 3  # 1 encoder + 1 decoder layer
    sample = a_sample(task)
    for mode in (True, False):
        plain.train(mode), wskip.train(mode)
        a, b = run(plain, sample), run(wskip, sample)
        assert torch.equal(a, b), f"train={mode}"
    assert not torch.equal(run(plain.train(), sample, 3), run(plain.train(), sample, 4))  # dropout is on


def test_eval_uses_wskip_and_equals_train_mode_without_dropout(data_bin):
    _, task, model, _ = build(data_bin, "--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0")
    model.load_state_dict(model.state_dict())  # fairseq 0.12.2 switches on its fused path after loading
    sample = a_sample(task)
    ones = run(model.eval(), sample)
    with torch.no_grad():
        for i, name in enumerate(wskip_parameter_names(model)):
            model.get_parameter(name).fill_(0.5 + 0.4 * i)
    evaluated = run(model.eval(), sample)
    assert not torch.allclose(evaluated, ones, atol=1e-3)
    assert torch.equal(evaluated, run(model.train(), sample))


def test_normalize_before_is_refused_with_a_clear_message(data_bin):
    for flag in ("--encoder-normalize-before", "--decoder-normalize-before"):
        with pytest.raises(SystemExit, match=flag):
            build(data_bin, flag, "--wskip-init", "admin")


def _masked_var(t, mask):  # t: T x B x C, mask: B x T (True at padding) or None
    if mask is not None:
        t = t[~mask.transpose(0, 1)]
    return t.double().var(unbiased=False).item()


def test_admin_matches_a_hand_computation_and_grows_with_depth(data_bin):
    _, task, model, _ = build(
        data_bin, "--encoder-layers", "2", "--decoder-layers", "2", "--wskip-init", "admin"
    )
    batches = [a_sample(task, 5), a_sample(task, 9)]
    model.train()
    values = admin_initialize(model, batches)
    assert model.training  # mode restored

    # By hand: forward hooks on the branch modules, w_skip set one sublayer at a time.
    hand = {}
    with torch.no_grad():
        for name in wskip_parameter_names(model):
            model.get_parameter(name).fill_(1.0)
    model.eval()
    order = []
    for stack in (model.encoder, model.decoder):
        for i, layer in enumerate(stack.layers):
            subs = [("self_attn", layer.self_attn)]
            if stack is model.decoder:
                subs.append(("encoder_attn", layer.encoder_attn))
            subs.append(("ffn", layer.fc2))
            order += [(stack, i, layer, s, m) for s, m in subs]
    acc = {}
    for stack, i, layer, sub, module in order:
        captured = []
        h1 = module.register_forward_hook(lambda m, inp, out: captured.append(out[0] if isinstance(out, tuple) else out))
        h0 = stack.layers[0].register_forward_pre_hook(lambda m, args: captured.append(("x0", args[0])))
        xs, fs = [], []
        for sample in batches:
            captured.clear()
            with torch.no_grad():
                model(**sample["net_input"])
            tokens = sample["net_input"]["src_tokens" if stack is model.encoder else "prev_output_tokens"]
            mask = tokens.eq(1)
            xs.append(captured[0][1][~mask.t()])
            fs.append(captured[1][~mask.t()])
        h0.remove(), h1.remove()
        if stack not in acc:
            acc[stack] = torch.cat(xs).double().var(unbiased=False).item()
        hand[f"{'encoder' if stack is model.encoder else 'decoder'}.layers.{i}.w_skip_{sub}"] = math.sqrt(acc[stack])
        with torch.no_grad():
            getattr(layer, "w_skip_" + sub).fill_(math.sqrt(acc[stack]))
        acc[stack] += torch.cat(fs).double().var(unbiased=False).item()

    assert list(values) == list(hand)
    for name in hand:
        assert values[name] == pytest.approx(hand[name], rel=1e-9), name
    for stack in ("encoder", "decoder"):
        seq = [v for n, v in values.items() if n.startswith(stack)]
        assert all(b > a for a, b in zip(seq, seq[1:])), seq


def test_gradinit_skips_wskip_by_default_and_scales_it_with_the_flag(data_bin):
    for flags, expect in (((), False), (("--gradinit-wskip",), True)):
        _, task, model, criterion = build(data_bin, *flags)
        result = run_gradinit(task, model, criterion, optimizer=object())
        names = set(wskip_parameter_names(model))
        assert bool(names & set(result.scales)) is expect
        assert not expect or names <= set(result.scales)


def test_fairseq_train_admin_then_gradinit_then_generate(data_bin, tmp_path):
    save = str(tmp_path / "ckpt")
    r = train(data_bin, save, "--arch", "transformer_wskip_iwslt_de_en", "--wskip-init", "admin",
              "--gradinit-wskip", "--max-update", "2", "--gradinit-iters", "3")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert log.index("Admin init") < log.index("GradInit done")
    scales = read_json(os.path.join(save, "gradinit_scales.json"))["scales"]
    assert any(".w_skip_" in n for n in scales)
    state = torch.load(os.path.join(save, "checkpoint_last.pt"), weights_only=False)["model"]
    assert state["encoder.layers.0.w_skip_self_attn"][0] != 1.0
    g = fairseq("fairseq-generate", data_bin, "--user-dir", USER_COMMAND[1], "--path",
                os.path.join(save, "checkpoint_last.pt"), "--gen-subset", "valid", "--cpu",
                "--beam", "2", "--max-len-b", "5", "--batch-size", "20")  # fmt: skip
    assert g.returncode == 0, g.stderr[-3000:]
    assert "Generate valid" in g.stdout + g.stderr


def test_wskip_init_on_an_architecture_without_wskip_is_refused(data_bin, tmp_path):
    r = train(data_bin, str(tmp_path / "x"), "--wskip-init", "admin", "--max-update", "1")
    assert r.returncode != 0
    assert "--wskip-init" in r.stderr and "Traceback" not in r.stderr
    r = train(data_bin, str(tmp_path / "y"), "--arch", "transformer_wskip_iwslt_de_en",
              "--wskip-init", "admin", "--encoder-normalize-before")  # fmt: skip
    assert r.returncode != 0
    assert "--encoder-normalize-before" in r.stderr and "Traceback" not in r.stderr
