"""The registry of losses by name (``LOSSES``, ``register_loss``, ``build_loss``)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

LOSSES: dict[str, type[nn.Module]] = {}
"""Registry name -> loss class; filled by ``@register_loss`` when the family modules load."""

_M = TypeVar("_M", bound=type[nn.Module])


def register_loss(name: str) -> Callable[[_M], _M]:
    """Class decorator that puts a loss into ``LOSSES`` under ``name``.

    Raises
    ------
    ValueError
        If ``name`` is already registered (no silent replacement).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"loss name must be a non-empty string, got {name!r}")

    def add(cls: _M) -> _M:
        if name in LOSSES:
            raise ValueError(
                f"loss name {name!r} is already used by {LOSSES[name].__qualname__}; "
                f"cannot register {cls.__qualname__} under it"
            )
        LOSSES[name] = cls
        return cls

    return add


def build_loss(spec: Mapping[str, Any]) -> nn.Module:
    """Build a loss from ``{"name": <registry name>, **parameters}``.

    Parameters
    ----------
    spec : Mapping
        ``spec["name"]`` is a key of ``LOSSES``; every other key is passed to the
        loss's ``__init__`` as a keyword argument.

    Returns
    -------
    torch.nn.Module
        The loss, called as ``loss(logits, target)``.

    Raises
    ------
    TypeError
        If ``spec`` is not a mapping.
    ValueError
        If ``spec`` has no ``"name"``, the name is unknown (the message suggests the
        closest known name and lists them all), or the parameters do not fit the loss.
    """
    if not isinstance(spec, Mapping):
        raise TypeError(f"loss spec must be a mapping with a 'name' key, got {spec!r}")
    if "name" not in spec:
        raise ValueError(f"loss spec {dict(spec)!r} has no 'name'; known losses: {sorted(LOSSES)}")
    name = spec["name"]
    params = {k: v for k, v in spec.items() if k != "name"}
    if name not in LOSSES:
        close = difflib.get_close_matches(str(name), list(LOSSES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown loss {name!r}.{hint} Known losses: {sorted(LOSSES)}")
    try:
        return LOSSES[name](**params)
    except TypeError as err:  # unexpected or missing keyword
        raise ValueError(f"loss {name!r}: bad parameters {params!r}: {err}") from err
