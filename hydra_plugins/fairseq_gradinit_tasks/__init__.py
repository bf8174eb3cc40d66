"""Loads fairseq-gradinit before fairseq-hydra-train reads its YAML.

fairseq-hydra-train fills each task config from fairseq's task registry before it imports
``common.user_dir``, so ``task: {_name: translation, gradinit: true}`` would be refused
(``Key 'gradinit' not in 'TranslationConfig'``). Hydra imports the modules of the
``hydra_plugins`` namespace while it starts, before it reads any config: the earliest point
where an installed package can register. Other hydra applications are left alone.
"""
import sys

if "fairseq" in sys.modules:
    import fairseq_gradinit  # noqa: F401
