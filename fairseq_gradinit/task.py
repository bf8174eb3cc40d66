"""Gives every fairseq task the --gradinit flags, including tasks registered after the plugin.

Importing the plugin puts, for each name in fairseq's task registry, a subclass of the
registered class with ``GradInitTaskMixin`` in front (same class name, same behaviour
without --gradinit), and extends the task's config the same way everywhere fairseq reads
it: the dataclass registry, hydra's ConfigStore (``fairseq-hydra-train`` YAML), the
argparse flags built from the dataclass, and ``add_args`` for legacy tasks without a
dataclass. ``fairseq.tasks.register_task`` is wrapped so that a task registered later
(a user's own ``--user-dir`` importing this package first, say) gets the same::

    import fairseq_gradinit                      # any time: before or after the tasks below
    from fairseq.tasks import register_task

    @register_task("my_task", dataclass=MyConfig)
    class MyTask(TranslationTask): ...          # --task my_task --gradinit works

``translation_gradinit`` and ``language_modeling_gradinit`` remain as aliases of the
extended ``translation`` and ``language_modeling`` tasks (earlier releases had only them).
"""
import dataclasses

import fairseq.tasks as fairseq_tasks
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.tasks import TASK_DATACLASS_REGISTRY, TASK_REGISTRY
from hydra.core.config_store import ConfigStore

from .config import GradInitConfig
from .hook import GradInitTaskMixin

ALIASES = {"translation_gradinit": "translation", "language_modeling_gradinit": "language_modeling"}


class _LegacyFlags:
    """--gradinit* flags for a legacy task, which declares its flags in ``add_args``."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        gen_parser_from_dataclass(parser, GradInitConfig())


def with_gradinit(name: str):
    """Replace the task registered as ``name`` by its GradInit-enabled subclass; return it."""
    task = TASK_REGISTRY[name]
    if issubclass(task, GradInitTaskMixin):
        return task
    config = TASK_DATACLASS_REGISTRY.get(name)
    bases = (GradInitTaskMixin, task) if config is not None else (GradInitTaskMixin, _LegacyFlags, task)
    extended = type(task.__name__, bases, {
        "__doc__": task.__doc__, "__module__": task.__module__, "__qualname__": task.__qualname__,
        "gradinit_task_name": name,
    })  # fmt: skip
    if config is not None:
        config = dataclasses.make_dataclass(config.__name__, [], bases=(config, GradInitConfig))
        # fairseq's FairseqTask.add_args builds the argparse flags from this attribute.
        setattr(extended, "__dataclass", config)
        _store(name, config)
    TASK_REGISTRY[name] = extended
    return extended


def _store(name: str, config) -> None:
    TASK_DATACLASS_REGISTRY[name] = config
    node = config()
    node._name = name
    ConfigStore.instance().store(name=name, group="task", node=node, provider="fairseq_gradinit")


_fairseq_register_task = fairseq_tasks.register_task


def register_task(name, dataclass=None):
    """fairseq's ``register_task``, then :func:`with_gradinit` on the new task."""
    register = _fairseq_register_task(name, dataclass)

    def register_task_cls(cls):
        registered = register(cls)
        if TASK_REGISTRY.get(name) is cls:  # not a name taken before
            with_gradinit(name)
        return registered  # the user's own class, so their subclasses get one mixin only

    return register_task_cls


register_task.__doc__ = (register_task.__doc__ or "") + (_fairseq_register_task.__doc__ or "")


def install() -> None:
    for name in list(TASK_REGISTRY):
        with_gradinit(name)
    for alias, name in ALIASES.items():
        TASK_REGISTRY[alias] = TASK_REGISTRY[name]
        if name in TASK_DATACLASS_REGISTRY:
            _store(alias, TASK_DATACLASS_REGISTRY[name])
    fairseq_tasks.register_task = register_task


install()
