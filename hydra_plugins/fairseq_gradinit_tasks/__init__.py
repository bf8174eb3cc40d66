"""Loads fairseq-gradinit before fairseq-hydra-train reads its YAML.

fairseq-hydra-train fills each task config from fairseq's task registry before it imports
``common.user_dir``, so ``task: {_name: translation, gradinit: true}`` would be refused
(``Key 'gradinit' not in 'TranslationConfig'``). Hydra imports the modules of the
``hydra_plugins`` namespace while it starts, before it reads any config: the earliest point
where an installed package can register.

Hydra also starts inside fairseq-train (fairseq composes its config with hydra) and in
other hydra applications; there the plugin is loaded by --user-dir or not at all, so this
module does nothing unless the program is fairseq-hydra-train.
"""
import sys


def _running_fairseq_hydra_train() -> bool:
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    return "fairseq_cli.hydra_train" in sys.modules or getattr(main, "name", None) == "fairseq_cli.hydra_train"


if _running_fairseq_hydra_train():
    import fairseq_gradinit  # noqa: F401
