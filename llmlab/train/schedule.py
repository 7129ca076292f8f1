"""Learning-rate schedules as closed forms of the update index.

``t`` is the 0-based index of the optimizer update (``t = 0`` is the first update), ``T = max_steps``,
``W = warmup_steps``, ``η = lr`` and ``η_min = lr · min_lr_ratio``.

Warm-up (all schedules), for ``t < W``::

    η_t = η · (t + 1) / W                      (rises linearly from η/W to η at t = W − 1)

After warm-up, with the schedule named in the config:

* ``constant``: ``η_t = η``
* ``cosine``:   ``p = min(1, (t − W) / (T − W))``,  ``η_t = η_min + (η − η_min) · ½ · (1 + cos(π p))``
* ``wsd`` (warm-up, stable, decay): ``D = max(W, T − ⌊decay_fraction · T⌋)``;
  ``η_t = η`` for ``t < D``, then ``η_t = η_min + (η − η_min) · max(0, T − t) / (T − D)``
  (a straight line from η at ``t = D`` to η_min at ``t = T``).
"""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "constant", "wsd")


def lr_at(step: int, cfg) -> float:
    """Learning rate for update ``step`` (0-based) under ``cfg`` (a ``TrainConfig``); see the module docstring."""
    peak, total, warmup = cfg.lr, cfg.max_steps, cfg.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    floor = peak * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = math.floor(round(cfg.decay_fraction * total, 9))     # 0.57 · 100 is 56.99999… in floats
        decay_start = max(warmup, total - decay_steps)
        if step < decay_start:
            return peak
        return floor + (peak - floor) * max(0, total - step) / max(1, total - decay_start)
    raise ValueError(f"unknown schedule {cfg.schedule!r}; use one of {', '.join(SCHEDULES)}")
