"""Architectures registered by the plugin (importing this registers them with fairseq)."""
from .wskip_transformer import (  # noqa: F401
    WSkipTransformerModel,
    wskip_layers,
    wskip_parameter_names,
)
from .tfixup_transformer import TFixupTransformerModel  # noqa: F401
