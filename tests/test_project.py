"""The project as a user meets it: README example, install hygiene, CI entry point."""
import importlib.metadata
import re

from conftest import ROOT


def test_readme_python_example_runs_and_scales_the_model():
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    scales = namespace["result"].scales
    assert set(scales) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert any(abs(v - 1) > 1e-4 for v in scales.values())


def test_environment_has_no_cuda_packages_and_no_torchaudio():
    names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    assert not {n for n in names if n.startswith("nvidia") or n == "torchaudio"}


def test_ci_runs_the_readme_test_command_and_the_official_release_tests():
    assert "make test" in (ROOT / "README.md").read_text()
    lines = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l and not l.startswith("#")]
    assert lines[-2:] == ["make test", "make test-official"]


def test_core_and_selection_import_only_torch():
    for name in ("core.py", "selection.py"):
        source = (ROOT / "fairseq_gradinit" / name).read_text()
        imports = re.findall(r"^\s*(?:from|import) ([\w.]+)", source, re.M)
        assert not [m for m in imports if m.split(".")[0] in ("fairseq", "omegaconf", "hydra")], name


def test_readme_flag_table_lists_every_gradinit_flag():
    from dataclasses import fields

    from fairseq_gradinit.config import GradInitConfig

    readme = (ROOT / "README.md").read_text()
    flags = ["--" + f.name.replace("_", "-") for f in fields(GradInitConfig) if f.name.startswith("gradinit")]
    missing = [flag for flag in flags if f"`{flag}" not in readme]
    assert not missing, f"README's flag table does not document {missing}"
