"""cmm_utils: models, merge kernels, training loops, metrics and plots for the cmm-book.

Rooms: ``data`` (manifests, loaders, scenarios), ``models`` (timm backbones, pretraining cache),
``merge`` (pure merge kernels over state dicts), ``train`` (one fit/evaluate loop), ``metrics``,
``plots``, ``io`` (atomic artifacts and checkpoints), and one module per paper.
"""
__version__ = "0.1.0"
