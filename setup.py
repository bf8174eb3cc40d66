from setuptools import find_namespace_packages, find_packages, setup

setup(
    name="fairseq-gradinit",
    version="0.1.0",
    description="GradInit (Zhu et al., NeurIPS 2021) as a fairseq --user-dir plugin: "
    "train Post-LN Transformers without learning-rate warmup.",
    # hydra_plugins/: makes fairseq-hydra-train know the gradinit keys of every task config.
    packages=find_packages(include=["fairseq_gradinit", "fairseq_gradinit.*"])
    + find_namespace_packages(include=["hydra_plugins.*"]),
    python_requires=">=3.8",
    # fairseq itself is not listed: the official 0.12.2 release and its maintained forks
    # install under different names, and an unpinned torch would pull a CUDA build.
    install_requires=[],
    entry_points={
        "console_scripts": ["fairseq-gradinit-report = fairseq_gradinit.report:cli_main"],
    },
)
