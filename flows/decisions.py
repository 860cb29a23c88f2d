"""Which decisions of a manifest changed between two runs (for scheduled reprocessing).

A *decision* is what the rules chose from the data: each loss rule's outcome (whether it
fired, what it selected and the parameters it set), the loss terms and their
parameters, the weighting method and its parameters, and the transform chosen for
every distribution. Numbers measured from the data move with every added case and are
not decisions: the normalization plan (percentiles, means, standard deviations) and a
chosen transform's offset or scale; provenance and time stamps are ignored.

This is a plain function (no Prefect); it belongs next to `stats.manifest` and is kept
here until it moves there.
"""

from __future__ import annotations

from typing import Any

from stats.manifest import Manifest


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_short(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def decision_changes(old: Manifest, new: Manifest) -> list[str]:
    """Human-readable list of the decisions that differ from `old` to `new`.

    Parameters are compared at 6 significant digits (`_short`), so float noise from a
    re-merge in another order is not reported as a change.

    Returns
    -------
    list of str
        Empty when every decision is the same, e.g.
        ``"R2 (distribution term): bce -> focal {gamma=2.1}"``,
        ``"transform label/tumour_volume_ml: identity -> ln"``.
    """
    changes: list[str] = []
    before = {d.rule: d for d in old.loss.decisions}
    after = {d.rule: d for d in new.loss.decisions}
    for rule in [*before, *(r for r in after if r not in before)]:
        a, b = before.get(rule), after.get(rule)
        if a is None or b is None:
            changes.append(f"{rule}: {'added' if a is None else 'removed'}")
            continue
        was = f"{a.outcome}{' ' + _short(a.params) if a.params else ''}"
        now = f"{b.outcome}{' ' + _short(b.params) if b.params else ''}"
        if a.fired != b.fired or was != now:
            changes.append(f"{rule} ({b.title}): {was} -> {now}"
                           + (f" (fired: {a.fired} -> {b.fired})" if a.fired != b.fired else ""))
    terms_a = [(t.name, _short(t.weight), _short(t.params)) for t in old.loss.terms]
    terms_b = [(t.name, _short(t.weight), _short(t.params)) for t in new.loss.terms]
    if terms_a != terms_b:
        def show(terms: list[tuple[str, str, str]]) -> str:
            return " + ".join(f"{w}·{n}{p if p != '{}' else ''}" for n, w, p in terms)

        changes.append(f"loss terms: {show(terms_a)} -> {show(terms_b)}")
    wa, wb = old.loss.weighting, new.loss.weighting
    if (wa.method, _short(wa.params)) != (wb.method, _short(wb.params)):
        changes.append(f"weighting: {wa.method} {_short(wa.params)} -> "
                       f"{wb.method} {_short(wb.params)}")
    for key in [*old.transforms, *(k for k in new.transforms if k not in old.transforms)]:
        a, b = old.transforms.get(key), new.transforms.get(key)
        if a is None or b is None:
            changes.append(f"transform {key}: {'added' if a is None else 'removed'}")
        elif a.chosen != b.chosen:
            changes.append(f"transform {key}: {a.chosen} -> {b.chosen}")
    return changes
