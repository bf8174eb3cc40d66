"""Other initializations: Admin closed form, DeepNet (DeepNorm), T-Fixup (LN-free)."""
import math
import os

import pytest
import torch

from conftest import USER_COMMAND, fairseq, train
from test_wskip import a_sample, build, run
from fairseq_gradinit.admin_analytic_init import admin_omega
from fairseq_gradinit.core import GradInitError
from fairseq_gradinit.deepnet_init import deepnet_constants
from fairseq_gradinit.hook import run_gradinit
from fairseq_gradinit.models import wskip_parameter_names
from fairseq_gradinit.tfixup_init import tfixup_factors

WSKIP = "transformer_wskip_iwslt_de_en"
TFIXUP = "transformer_tfixup_iwslt_de_en"
PLAIN = "transformer_iwslt_de_en"
# Wide enough for the spread of a weight matrix to be measured to a few percent.
WIDE = ("--encoder-embed-dim", "64", "--decoder-embed-dim", "64", "--encoder-ffn-embed-dim", "256",
        "--decoder-ffn-embed-dim", "256", "--encoder-layers", "2", "--decoder-layers", "3")  # fmt: skip


# --- the formulas, against values worked out by hand -------------------------------------


def test_admin_omega_is_the_admin_torch_closed_form():
    # sqrt((K+1)/ln(K+1) - 1): K=2: 3/1.098612 - 1 = 1.730718; K=12: 13/2.564949 - 1 = 4.068326
    assert admin_omega(2) == pytest.approx(math.sqrt(1.730718), abs=2e-6)
    assert admin_omega(12) == pytest.approx(2.017009, abs=2e-6)
    assert admin_omega(18) == pytest.approx(2.335132, abs=2e-6)
    with pytest.raises(ValueError):
        admin_omega(0)


def test_deepnet_constants_are_the_papers_encoder_decoder_values():
    # N = M = 6: (N^4 M)^(1/16) = 6^(5/16) = 1.750541
    c = deepnet_constants(6, 6)
    assert c["encoder"] == pytest.approx((0.81 * 1.750541, 0.87 / 1.750541), abs=2e-6)
    assert c["decoder"] == pytest.approx((18**0.25, 72**-0.25), rel=1e-9)
    assert c["decoder"] == pytest.approx((2.059767, 0.343295), abs=2e-6)
    # N = 18, M = 2: (18^4 * 2)^(1/16) = 2.150961
    c = deepnet_constants(18, 2)
    assert c["encoder"] == pytest.approx((0.81 * 2.150961, 0.87 / 2.150961), abs=2e-6)
    assert c["decoder"] == pytest.approx((6**0.25, 24**-0.25), rel=1e-9)


def test_tfixup_factors_follow_the_authors_code():
    f = tfixup_factors(3, 5)
    assert f["encoder"] == pytest.approx(0.67 / 3**0.25, rel=1e-9)
    assert f["encoder"] == pytest.approx(0.509090, abs=2e-6)
    assert f["decoder"] == pytest.approx(0.386097, abs=2e-6)  # 45^(-1/4)
    assert f["encoder_embedding"] == pytest.approx(0.438691, abs=2e-6)  # 27^(-1/4): code, not paper
    assert f["decoder_embedding"] == f["decoder"]


# --- which tensors got which initialization ---------------------------------------------


def _params(model):
    return dict(model.named_parameters())


def _xavier_std(w):
    fan_out, fan_in = w.shape
    return math.sqrt(2.0 / (fan_in + fan_out))


def test_admin_analytic_fills_each_stack_with_its_omega_and_keeps_w_skip_learnable(data_bin):
    _, _, ones, _ = build(data_bin, *WIDE, seed=5)
    _, _, admin, _ = build(data_bin, *WIDE, "--wskip-init", "admin-analytic", seed=5)
    a, o = _params(admin), _params(ones)
    for name in wskip_parameter_names(admin):
        k = 2 * 2 if name.startswith("encoder") else 3 * 3
        assert torch.all(a[name] == admin_omega(k)), name
        assert a[name].requires_grad
    for name in a:  # nothing but w_skip changed
        if ".w_skip_" not in name:
            assert torch.equal(a[name], o[name]), name


def test_deepnet_sets_a_frozen_alpha_and_draws_xavier_normal_with_gain_beta(data_bin):
    _, _, ones, _ = build(data_bin, *WIDE, seed=5)
    _, _, deep, _ = build(data_bin, *WIDE, "--wskip-init", "deepnet", seed=5)
    c = deepnet_constants(2, 3)
    d, o = _params(deep), _params(ones)
    for name in wskip_parameter_names(deep):
        alpha = c["encoder" if name.startswith("encoder") else "decoder"][0]
        assert torch.all(d[name] == alpha) and not d[name].requires_grad, name
    redrawn = set()
    for name, p in d.items():
        stack, leaf = name.split(".")[0], name.rsplit(".", 1)[-1]
        beta = c[stack][1]
        module = name.rsplit(".", 2)[-2]
        if leaf == "weight" and module in ("fc1", "fc2", "v_proj", "out_proj", "q_proj", "k_proj"):
            gain = 1.0 if module in ("q_proj", "k_proj") else beta
            std = p.detach().std().item()
            assert std == pytest.approx(gain * _xavier_std(p), rel=0.08), name
            assert p.abs().max().item() > 2.2 * std, name  # normal, not uniform (max 1.73 std)
            redrawn.add(name)
        elif leaf == "bias" and module in ("fc1", "fc2", "v_proj", "out_proj"):
            assert torch.equal(p, o[name] * beta), name
        elif ".w_skip_" not in name:  # embeddings, LayerNorms, q/k biases: fairseq's
            assert torch.equal(p, o[name]), name
    assert any("encoder_attn.v_proj" in n for n in redrawn)  # the decoder's cross-attention too
    assert len(redrawn) == 2 * 6 + 3 * 10


def test_gradinit_wskip_is_refused_on_deepnet_and_scales_admin_analytic_w_skip(data_bin):
    _, task, deep, criterion = build(data_bin, "--wskip-init", "deepnet", "--gradinit-wskip")
    with pytest.raises(GradInitError, match="--gradinit-wskip"):
        run_gradinit(task, deep, criterion, optimizer=object())
    _, task, deep, criterion = build(data_bin, "--wskip-init", "deepnet")
    result = run_gradinit(task, deep, criterion, optimizer=object())
    assert not any(".w_skip_" in n for n in result.scales)
    alpha = deepnet_constants(1, 1)
    for name in wskip_parameter_names(deep):  # GradInit left the constants alone
        assert torch.all(deep.get_parameter(name) == alpha[name.split(".")[0]][0]), name
    _, task, admin, criterion = build(data_bin, "--wskip-init", "admin-analytic", "--gradinit-wskip")
    result = run_gradinit(task, admin, criterion, optimizer=object())
    assert set(wskip_parameter_names(admin)) <= set(result.scales)


def test_tfixup_default_init_is_fairseqs_transformer_without_its_layernorms(data_bin):
    no_dropout = ("--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0")
    _, task, plain, _ = build(data_bin, *WIDE, *no_dropout, arch=PLAIN, seed=5)
    _, _, free, _ = build(data_bin, *WIDE, *no_dropout, "--tfixup-init", "default", arch=TFIXUP, seed=5)
    p, f = plain.state_dict(), free.state_dict()
    assert set(f) == {k for k in p if "layer_norm" not in k}
    assert all(torch.equal(f[k], p[k]) for k in f)
    assert not any("LayerNorm" in type(m).__name__ for m in free.modules())
    # The same computation as fairseq's transformer with its LayerNorms taken out.
    for module in list(plain.modules()):
        for name, child in list(module.named_children()):
            if "LayerNorm" in type(child).__name__:
                setattr(module, name, torch.nn.Identity())
    sample = a_sample(task)
    assert torch.equal(run(free.eval(), sample), run(plain.eval(), sample))


def test_tfixup_scales_the_tensors_the_authors_scale(data_bin):
    _, _, plain, _ = build(data_bin, *WIDE, "--tfixup-init", "default", arch=TFIXUP, seed=5)
    _, _, fix, _ = build(data_bin, *WIDE, arch=TFIXUP, seed=5)
    f = tfixup_factors(2, 3)
    a, o = _params(fix), _params(plain)
    assert torch.equal(a["encoder.embed_tokens.weight"], o["encoder.embed_tokens.weight"] * f["encoder_embedding"])
    assert torch.equal(a["decoder.embed_tokens.weight"], o["decoder.embed_tokens.weight"] * f["decoder_embedding"])
    for name, p in a.items():
        stack, module, leaf = name.split(".")[0], name.rsplit(".", 2)[-2], name.rsplit(".", 1)[-1]
        factor = f[stack]
        if module == "out_proj" and leaf == "weight":
            assert torch.equal(p, o[name] * factor), name
        elif module in ("fc1", "fc2", "v_proj") and leaf == "weight":
            bound = factor * math.sqrt(3) * _xavier_std(p)  # Xavier uniform, gain = factor
            assert p.abs().max().item() <= bound and p.abs().max().item() > 0.95 * bound, name
        elif module in ("fc1", "fc2") and leaf == "bias":
            assert not p.any(), name
        elif "embed_tokens" not in name:  # q, k, their biases, v and out_proj biases: fairseq's
            assert torch.equal(p, o[name]), name
    # One shared table is scaled once, by the encoder's factor.
    _, _, shared, _ = build(data_bin, *WIDE, "--share-all-embeddings", arch=TFIXUP, seed=5)
    _, _, shared0, _ = build(data_bin, *WIDE, "--share-all-embeddings", "--tfixup-init", "default", arch=TFIXUP, seed=5)
    assert shared.decoder.embed_tokens.weight is shared.encoder.embed_tokens.weight
    assert torch.equal(shared.encoder.embed_tokens.weight, shared0.encoder.embed_tokens.weight * f["encoder_embedding"])


@pytest.mark.parametrize("flag", ["--encoder-normalize-before", "--decoder-normalize-before", "--layernorm-embedding"])
def test_tfixup_refuses_flags_that_add_layernorm(data_bin, flag):
    with pytest.raises(SystemExit, match=flag):
        build(data_bin, flag, arch=TFIXUP)


# --- stock fairseq-train and fairseq-generate --------------------------------------------


def _generate(data_bin, checkpoint):
    g = fairseq("fairseq-generate", data_bin, "--user-dir", USER_COMMAND[1], "--path", checkpoint,
                "--gen-subset", "valid", "--cpu", "--beam", "2", "--max-len-b", "5", "--batch-size", "20")  # fmt: skip
    assert g.returncode == 0, g.stderr[-3000:]
    assert "Generate valid" in g.stdout + g.stderr


def test_fairseq_train_deepnet_with_gradinit_keeps_alpha_fixed_then_generates(data_bin, tmp_path):
    save = str(tmp_path / "deep")
    r = train(data_bin, save, "--arch", WSKIP, "--wskip-init", "deepnet", "--encoder-layers", "2",
              "--max-update", "3", "--gradinit-iters", "3")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert log.index("DeepNet init (--wskip-init deepnet): encoder alpha=0.9633") < log.index("GradInit done")
    state = torch.load(os.path.join(save, "checkpoint_last.pt"), weights_only=False)["model"]
    alpha = deepnet_constants(2, 1)
    assert torch.all(state["encoder.layers.1.w_skip_ffn"] == alpha["encoder"][0])
    assert torch.all(state["decoder.layers.0.w_skip_encoder_attn"] == alpha["decoder"][0])
    _generate(data_bin, os.path.join(save, "checkpoint_last.pt"))


def test_fairseq_train_tfixup_with_gradinit_then_generates(data_bin, tmp_path):
    save = str(tmp_path / "tfixup")
    r = train(data_bin, save, "--arch", TFIXUP, "--max-update", "3", "--gradinit-iters", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert log.index("T-Fixup init (N=1, M=1)") < log.index("GradInit done")
    state = torch.load(os.path.join(save, "checkpoint_last.pt"), weights_only=False)["model"]
    assert not any("layer_norm" in k for k in state)
    _generate(data_bin, os.path.join(save, "checkpoint_last.pt"))


def test_fairseq_train_tfixup_with_normalize_before_fails_in_one_line(data_bin, tmp_path):
    r = train(data_bin, str(tmp_path / "x"), "--arch", TFIXUP, "--encoder-normalize-before", "--max-update", "1")
    assert r.returncode != 0
    assert "--encoder-normalize-before" in r.stderr and "Traceback" not in r.stderr


def test_docstring_examples_of_the_init_modules_hold():
    import doctest

    from fairseq_gradinit import admin_analytic_init, deepnet_init, tfixup_init

    for module in (admin_analytic_init, deepnet_init, tfixup_init):
        failed, attempted = doctest.testmod(module)
        assert attempted and not failed, module.__name__


def test_fairseq_train_deepnet_with_gradinit_wskip_fails_in_one_line(data_bin, tmp_path):
    r = train(data_bin, str(tmp_path / "x"), "--arch", WSKIP, "--wskip-init", "deepnet", "--gradinit-wskip")
    assert r.returncode != 0
    assert "--gradinit-wskip: the w_skip of this model are constants" in r.stderr
    assert "Traceback" not in r.stderr
