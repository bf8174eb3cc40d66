"""fairseq-gradinit: GradInit (Zhu et al., NeurIPS 2021) as a fairseq --user-dir plugin.

Importing this package gives every fairseq task the --gradinit flags (task.py) and
registers the transformer_wskip* models. The algorithm itself (``fairseq_gradinit.core``)
needs only torch.
"""
import argparse
import os

import torch

# fairseq 0.12 checkpoints pickle an argparse.Namespace; torch >= 2.6 loads with
# weights_only=True and refuses it, which breaks resume, --restore-file and
# fairseq-generate --path. Allow that one class.
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([argparse.Namespace])

from . import task  # noqa: E402,F401  (registers the tasks)
from . import models  # noqa: E402,F401  (registers transformer_wskip*; issue 3)


def _accept_fairseqs_spelling_of_this_directory():
    """Let ``--user-dir fairseq_gradinit`` name this package after it was imported.

    For a --user-dir that is not in the working directory fairseq tries
    ``<site-packages>/fairseq/../fairseq_gradinit``, and if the package is imported already
    (fairseq-hydra-train loads it early, see hydra_plugins/) it compares that string with
    ``__path__``: a different spelling of the same directory is refused as "not globally
    unique".
    """
    import fairseq.utils

    spelling = os.path.join(os.path.dirname(fairseq.utils.__file__), "..", __name__)
    here = __path__[0]
    if spelling not in __path__ and os.path.isdir(spelling) and os.path.samefile(spelling, here):
        __path__.append(spelling)


_accept_fairseqs_spelling_of_this_directory()
