"""The Python files that every exported Hugging Face model directory carries.

They import only torch and transformers (never this project), so that an export runs
anywhere with ``trust_remote_code=True``. The exporter copies them, together with
``megatron_ztt/model/cycle_engine.py`` and ``exit_policy.py`` (the cycle loop and exit policy
the training model runs too), which ``modeling_ztt.py`` imports as its siblings. This ``__init__`` only lets the
project import the files for checks and tests, and is not exported.
"""

import sys

from megatron_ztt.model import cycle_engine, exit_policy

# Inside the project the sibling is the training code's own module, not a copy.
sys.modules[f"{__name__}.cycle_engine"] = cycle_engine
sys.modules[f"{__name__}.exit_policy"] = exit_policy
