"""Registers the GradInit tasks, and gives fairseq's own tasks of the same kind the flags.

``translation_gradinit`` and ``language_modeling_gradinit`` are the explicit tasks. Users who never pass ``--task`` get the
same behaviour because the plugin puts the same class under the name ``translation``
(in fairseq's two task registries and in hydra's ConfigStore, which builds the config
from the command line). Without --gradinit both behave exactly like fairseq's own task.
"""
from dataclasses import dataclass

from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY, register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from hydra.core.config_store import ConfigStore

from .config import GradInitConfig
from .hook import GradInitTaskMixin


@dataclass
class GradInitTranslationConfig(TranslationConfig, GradInitConfig):
    pass


@register_task("translation_gradinit", dataclass=GradInitTranslationConfig)
class GradInitTranslationTask(GradInitTaskMixin, TranslationTask):
    """fairseq's translation task, with GradInit before the first update (--gradinit)."""


@dataclass
class GradInitLanguageModelingConfig(LanguageModelingConfig, GradInitConfig):
    pass


@register_task("language_modeling_gradinit", dataclass=GradInitLanguageModelingConfig)
class GradInitLanguageModelingTask(GradInitTaskMixin, LanguageModelingTask):
    """fairseq's language-modeling task, with GradInit before the first update (--gradinit)."""


def replace_task(name: str, task_cls, config_cls) -> None:
    """Make ``--task name`` (or fairseq's default task) build ``task_cls``."""
    TASK_REGISTRY[name] = task_cls
    TASK_DATACLASS_REGISTRY[name] = config_cls
    node = config_cls()
    node._name = name
    ConfigStore.instance().store(name=name, group="task", node=node, provider="fairseq_gradinit")


replace_task("translation", GradInitTranslationTask, GradInitTranslationConfig)
replace_task("language_modeling", GradInitLanguageModelingTask, GradInitLanguageModelingConfig)
