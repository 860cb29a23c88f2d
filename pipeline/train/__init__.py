"""The bundled PyTorch trainer: the loss zoo and its registry, adaptive weighting.

Sub-packages and modules
------------------------
``pipeline.train.losses``
    Every loss the manifest may name, built by ``build_loss(spec)``.
``pipeline.train.weighting``
    Weighting of the terms of a compound loss (static, rebalance, SoftAdapt,
    coefficient of variations).
"""

from __future__ import annotations
