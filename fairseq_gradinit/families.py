"""The model families GradInit is run on, and the refusal of every other one at start-up.

A family is supported when GradInit's batches split cleanly for it (``fairseq_batches``
trims each half's padding, which fairseq's LSTM requires) and its weights are among the
tensors ``selection.py`` scales, both checked by an end-to-end test. Others (lightconv,
dynamicconv, fconv_self_att, speech models, ...) may or may not work and are refused
rather than silently given a wrong initialization.
"""
from typing import List, Tuple

#: (module, class name, --arch family words) of the supported fairseq model classes;
#: subclasses count too (transformer_wskip*, BART are TransformerModels).
SUPPORTED: List[Tuple[str, str, str]] = [
    ("fairseq.models.transformer", "TransformerModelBase", "transformer*"),
    ("fairseq.models.transformer_lm", "TransformerLanguageModel", "transformer_lm*"),
    ("fairseq.models.lstm", "LSTMModel", "lstm*"),
    ("fairseq.models.lstm_lm", "LSTMLanguageModel", "lstm_lm*"),
    ("fairseq.models.fconv", "FConvModel", "fconv*"),
    ("fairseq.models.fconv_lm", "FConvLanguageModel", "fconv_lm*"),
    ("fairseq.models.roberta", "RobertaModel", "roberta*"),
]


def supported_classes() -> tuple:
    import importlib

    return tuple(getattr(importlib.import_module(module), name) for module, name, _ in SUPPORTED)


def unsupported_reason(model, arch: str, task: str = None):
    """None for a supported model, else the one-line reason it is refused."""
    if isinstance(model, supported_classes()):
        return None
    families = ", ".join(words for _, _, words in SUPPORTED)
    where = f"--task {task} " if task else ""
    return (
        f"{where}--arch {arch} ({type(model).__name__}) is not a model family GradInit was made "
        f"for: it supports {families} (see README 'Supported architectures')"
    )
