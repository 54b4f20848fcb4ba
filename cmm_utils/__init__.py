"""cmm_utils: models, merge kernels, training loops, metrics and plots for the cmm-book.

Rooms: ``data`` (manifests, loaders, scenarios), ``models`` (timm backbones, pretraining cache),
``merge`` (pure merge kernels over state dicts), ``train`` (one fit/evaluate loop), ``metrics``,
``plots``, ``io`` (atomic artifacts and checkpoints), and one module per paper.
"""
import os as _os
from pathlib import Path as _Path

__version__ = "0.1.0"

ROOT_VARIABLES = ("CMM_DATA", "CMM_CACHE", "CMM_RESULTS")


def anchor_root_variables() -> None:
    """Make relative ``CMM_DATA`` / ``CMM_CACHE`` / ``CMM_RESULTS`` absolute, read against the working
    directory of the process that imports ``cmm_utils`` first (the runner, pytest, a shell script).

    Notebook kernels start in ``notebooks/`` (papermill's ``cwd``, nbval): without this, the README's
    ``CMM_DATA=../shared/data`` would point somewhere else inside every kernel. Kernels inherit the
    absolute value from the environment.
    """
    for name in ROOT_VARIABLES:
        value = _os.environ.get(name)
        if value and not _Path(value).expanduser().is_absolute():
            _os.environ[name] = str(_Path(value).expanduser().resolve())


anchor_root_variables()
