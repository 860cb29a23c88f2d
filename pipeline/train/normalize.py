"""The manifest's intensity normalization plan, applied per channel (adapter module).

The manifest states, for every channel: an intensity transform (name and parameters,
chosen from identity / ln / log10 / arcsin-sqrt by the statistics stage), then a clip at
the 0.5 and 99.5 percentile values and a z-score with the dataset mean and standard
deviation, all four numbers on the *transformed* scale (thesis section 6.3). This module
is the only place that knows the manifest's field names for that plan
(``NormalizationPlan.from_manifest``); everything else in the trainer uses
``NormalizationPlan`` and ``ChannelNorm``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from pipeline.errors import ManifestError

Forward = Callable[[NDArray[np.floating]], NDArray[np.floating]]


def _identity(x: NDArray[np.floating]) -> NDArray[np.floating]:
    return x


@dataclass(frozen=True)
class ChannelNorm:
    """Normalization of one channel: transform, clip, z-score.

    Parameters
    ----------
    channel : str
        Channel name (as in the store's ``channels``).
    clip_low, clip_high : float
        Clip bounds on the transformed scale (the dataset's 0.5 / 99.5 percentiles).
    mean, std : float
        Dataset mean and standard deviation on the transformed scale (std > 0).
    transform : str, default "identity"
        Name of the intensity transform (for records; the function is ``forward``).
    forward : callable, default identity
        The transform's forward function, applied elementwise to float64 values.
    raw_clip_low, raw_clip_high : float or None
        The same percentiles on the raw scale. When given, raw values are clipped to
        them *before* the transform (keeping them inside its domain, e.g. ln's); for a
        strictly increasing transform this equals clipping ``forward(x)`` to
        ``[clip_low, clip_high]`` (the manifest's ``ChannelNormalization.apply``).
    """

    channel: str
    clip_low: float
    clip_high: float
    mean: float
    std: float
    transform: str = "identity"
    forward: Forward = field(default=_identity, compare=False, repr=False)
    raw_clip_low: float | None = None
    raw_clip_high: float | None = None

    def __post_init__(self) -> None:
        values = (self.clip_low, self.clip_high, self.mean, self.std)
        if not all(math.isfinite(float(v)) for v in values):
            raise ValueError(f"channel {self.channel!r}: normalization values must be finite, "
                             f"got clip ({self.clip_low!r}, {self.clip_high!r}), mean "
                             f"{self.mean!r}, std {self.std!r}")
        if not self.clip_low <= self.clip_high:
            raise ValueError(f"channel {self.channel!r}: clip_low {self.clip_low!r} exceeds "
                             f"clip_high {self.clip_high!r}")
        if not self.std > 0:
            raise ValueError(f"channel {self.channel!r}: std must be > 0, got {self.std!r}")

    def apply(self, volume: NDArray[np.floating]) -> NDArray[np.float32]:
        """``(clip(forward(x), clip_low, clip_high) - mean) / std``, as float32."""
        x = np.asarray(volume, dtype=np.float64)
        if self.raw_clip_low is not None or self.raw_clip_high is not None:
            x = np.clip(x, self.raw_clip_low, self.raw_clip_high)
        y = np.asarray(self.forward(x), dtype=np.float64)
        y = np.clip(y, self.clip_low, self.clip_high)
        return ((y - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"channel": self.channel, "transform": self.transform,
                "raw_clip_low": self.raw_clip_low, "raw_clip_high": self.raw_clip_high,
                "clip_low": self.clip_low, "clip_high": self.clip_high,
                "mean": self.mean, "std": self.std}


@dataclass(frozen=True)
class NormalizationPlan:
    """Per-channel normalization of a case's image ``(C, Z, Y, X)``.

    Parameters
    ----------
    channels : sequence of ChannelNorm
        One entry per image channel, in the store's channel order.

    Notes
    -----
    For channel c with transform ``T``: ``x' = (clip(T(x), q_0.5, q_99.5) - mu) / sigma``
    (thesis section 6.3: percentile clipping 0.5 / 99.5, then z-score), with
    ``q``, ``mu``, ``sigma`` dataset statistics of ``T(x)`` over brain voxels. Voxels
    outside the brain mask, when one is given, are set to 0 after normalization (the
    dataset mean), as nnU-Net does for skull-stripped MRI.
    """

    channels: tuple[ChannelNorm, ...]

    def __post_init__(self) -> None:
        if not self.channels:
            raise ValueError("a normalization plan needs at least one channel")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.channel for c in self.channels)

    def check_channels(self, store_channels: Sequence[str]) -> None:
        """Raise ``ValueError`` unless the plan's channels are the store's, in order."""
        if tuple(store_channels) != self.names:
            raise ValueError(f"normalization plan channels {list(self.names)!r} differ from the "
                             f"store's channels {list(store_channels)!r}")

    def apply(self, image: NDArray[np.floating], brain: NDArray[np.bool_] | None = None
              ) -> torch.Tensor:
        """Normalize an image ``(C, *spatial)``; returns a float32 tensor of that shape.

        Raises
        ------
        ValueError
            If the image does not have one channel per plan entry, or ``brain`` does not
            match its spatial shape.
        """
        img = np.asarray(image)
        if img.ndim < 2 or img.shape[0] != len(self.channels):
            raise ValueError(f"image of shape {img.shape!r} does not have the plan's "
                             f"{len(self.channels)} channels {list(self.names)!r} on axis 0")
        out = np.empty(img.shape, dtype=np.float32)
        for i, norm in enumerate(self.channels):
            out[i] = norm.apply(img[i])
        if brain is not None:
            mask = np.asarray(brain, dtype=bool)
            if mask.shape != img.shape[1:]:
                raise ValueError(f"brain mask shape {mask.shape!r} differs from the image's "
                                 f"spatial shape {img.shape[1:]!r}")
            out[:, ~mask] = 0.0
        return torch.from_numpy(out)

    def to_dict(self) -> dict[str, Any]:
        return {"channels": [c.to_dict() for c in self.channels]}

    @classmethod
    def from_manifest(cls, manifest: Any, channels: Sequence[str] | None = None, *,
                      source: str = "manifest") -> NormalizationPlan:
        """The plan of a validated manifest (``stats.manifest.Manifest``).

        Reads ``manifest.normalization[channel]`` (``ChannelNormalization``: ``transform``
        ``{name, params}``, ``raw_clip_low``, ``raw_clip_high``, ``clip_low``,
        ``clip_high``, ``mean``, ``std``) for every channel, in the order of ``channels``
        (the store's; default ``manifest.dataset.channels``). The transform's forward
        function comes from ``stats.transforms.make_transform``; the result equals
        ``ChannelNormalization.apply``.

        Raises
        ------
        ManifestError
            If a channel has no plan or a plan is unusable; the message names ``source``
            and the field.
        """
        order = list(channels) if channels is not None else list(manifest.dataset.channels)
        norms = []
        for ch in order:
            where = f"{source}: field normalization.{ch}"
            if ch not in manifest.normalization:
                raise ManifestError(f"{where}: no normalization plan for channel {ch!r}; the "
                                    f"manifest has {sorted(manifest.normalization)!r}")
            entry = manifest.normalization[ch]
            try:
                norms.append(ChannelNorm(
                    channel=str(ch), clip_low=float(entry.clip_low),
                    clip_high=float(entry.clip_high), mean=float(entry.mean),
                    std=float(entry.std), transform=str(entry.transform.name),
                    forward=resolve_transform(entry.transform.name, entry.transform.params),
                    raw_clip_low=float(entry.raw_clip_low),
                    raw_clip_high=float(entry.raw_clip_high),
                ))
            except (AttributeError, TypeError, ValueError) as err:
                raise ManifestError(f"{where}: {err}") from err
        return cls(tuple(norms))


def resolve_transform(name: str, params: Mapping[str, Any]) -> Forward:
    """The forward function of the statistics stage's transform ``name`` with ``params``
    (``stats.transforms.make_transform``)."""
    from stats.transforms import make_transform

    return make_transform(name, dict(params)).forward


__all__ = ["ChannelNorm", "NormalizationPlan", "resolve_transform"]
