"""fairseq-gradinit: GradInit (Zhu et al., NeurIPS 2021) as a fairseq --user-dir plugin.

Importing this package registers the plugin's tasks with fairseq. The algorithm itself
(``fairseq_gradinit.core``) needs only torch.
"""
import argparse

import torch

# fairseq 0.12 checkpoints pickle an argparse.Namespace; torch >= 2.6 loads with
# weights_only=True and refuses it, which breaks resume, --restore-file and
# fairseq-generate --path. Allow that one class.
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([argparse.Namespace])

from . import task  # noqa: E402,F401  (registers the tasks)
from . import models  # noqa: E402,F401  (registers transformer_wskip*; issue 3)
