"""Plain progress lines of a training run: one log line per epoch, with the time left.

The trainer reports progress as events (`pipeline.train.loop.train_fold` and
`pipeline.train.benchmark.run_benchmark`): ``"start"`` (the losses, folds and epochs of
the whole run), ``"step"``, ``"epoch"`` and ``"fold_done"``. `ProgressLog` turns them
into one logging line per epoch, for output that is not a terminal (a log file, CI, a
Prefect worker)::

    manifest fold 1/2 epoch 3/10: loss 0.4312, weights dice 0.50 bce 0.50, α 0.31 β 0.69,
    val Dice 0.812; 2/40 epochs, 1m02s elapsed, about 19m40s left

(one line; wrapped here). ``weights`` are the epoch means of a manifest loss's effective
term weights, ``α β`` those of an adaptive Tversky term, ``val Dice`` appears on the
epochs that validate. The time left is the mean time per epoch trained in this process
times the epochs not done yet; folds completed earlier and reused on resume count as
done and not as time.

``xrai train`` draws rich progress bars on a terminal and logs these lines otherwise;
the flows always log them, through Prefect's run logger.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

#: The logger of the progress lines (``PREFECT_LOGGING_EXTRA_LOGGERS=pipeline`` sends it
#: to Prefect's run logs when the trainer runs outside a flow's own logger).
LOGGER_NAME = "pipeline.train"


def format_duration(seconds: float) -> str:
    """``"45s"``, ``"3m05s"``, ``"2h07m"``; ``"?"`` for NaN or a negative value.

    Examples
    --------
    >>> format_duration(185), format_duration(7620), format_duration(float("nan"))
    ('3m05s', '2h07m', '?')
    """
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def epoch_line(event: Mapping[str, Any], *, folds: int | None = None) -> str:
    """The first part of a progress line: loss, fold, epoch, training loss, weights, Dice.

    Parameters
    ----------
    event : mapping
        An ``"epoch"`` event (``loss``, ``fold`` 0-based, ``epoch`` 1-based, ``epochs``,
        ``train_loss``; optional ``weights`` with ``term_names``, ``alpha``, ``beta``,
        ``val_dice``).
    folds : int, optional
        Number of folds, shown as ``fold i/k``.
    """
    fold = f"{event['fold'] + 1}/{folds}" if folds else f"{event['fold'] + 1}"
    parts = [f"{event['loss']} fold {fold} epoch {event['epoch']}/{event['epochs']}: "
             f"loss {event['train_loss']:.4f}"]
    weights: Sequence[float] = event.get("weights") or ()
    if weights:
        names = list(event.get("term_names") or ()) or [f"term{i}" for i in range(len(weights))]
        parts.append("weights " + " ".join(f"{n} {w:.2f}" for n, w in
                                          zip(names, weights, strict=False)))
    if event.get("alpha") is not None and event.get("beta") is not None:
        parts.append(f"α {event['alpha']:.2f} β {event['beta']:.2f}")
    if event.get("val_dice") is not None:
        parts.append(f"val Dice {event['val_dice']:.3f}")
    return ", ".join(parts)


class ProgressLog:
    """A progress callback that logs one line per epoch (see the module docstring).

    Parameters
    ----------
    logger : logging.Logger or LoggerAdapter, optional
        Where the lines go (INFO); default ``logging.getLogger("pipeline.train")``.
    total_epochs : int, optional
        Epochs of the whole run (losses × folds × epochs); the ``"start"`` event of
        `run_benchmark` sets it when not given.
    clock : callable, default time.monotonic
        Seconds; a test passes a fake clock.
    """

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter | None = None, *,
                 total_epochs: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger if logger is not None else logging.getLogger(LOGGER_NAME)
        self.total = total_epochs
        self.folds: int | None = None
        self.epochs: int | None = None
        self.clock = clock
        self.t0 = clock()
        self.trained = 0  # epochs trained in this process (the rate's denominator)
        self.done = 0     # epochs done, including folds reused on resume
        self.folds_done = 0

    def __call__(self, event: Mapping[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "start":
            self.folds, self.epochs = int(event["folds"]), int(event["epochs"])
            if self.total is None:
                self.total = len(event["losses"]) * self.folds * self.epochs
            self.logger.info("training %s: %d folds × %d epochs (%d epochs in all)",
                             ", ".join(event["losses"]), self.folds, self.epochs, self.total)
        elif kind == "epoch":
            self.trained += 1
            self.done += 1
            self.logger.info("%s; %s", epoch_line(event, folds=self.folds), self._timing())
        elif kind == "fold_done":
            self.folds_done += 1
            if self.epochs:  # a fold reused on resume sent no epoch events: count it done
                self.done = max(self.done, self.folds_done * self.epochs)
            fold = f"{event['fold'] + 1}/{self.folds}" if self.folds else f"{event['fold'] + 1}"
            self.logger.info("%s fold %s done: validation Dice %.3f", event["loss"], fold,
                             event["dice"])

    def _timing(self) -> str:
        elapsed = self.clock() - self.t0
        head = f"{self.done}/{self.total} epochs, " if self.total else ""
        if not self.total or not self.trained:
            return f"{head}{format_duration(elapsed)} elapsed"
        left = elapsed / self.trained * max(self.total - self.done, 0)
        return f"{head}{format_duration(elapsed)} elapsed, about {format_duration(left)} left"


__all__ = ["LOGGER_NAME", "ProgressLog", "epoch_line", "format_duration"]
