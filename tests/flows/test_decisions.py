"""Which manifest decisions changed (stats.manifest.decision_changes); no server."""

from __future__ import annotations

import math

from stats.manifest import decision_changes

from .conftest import PlainRun


def _with_decision(manifest, rule: str, **update):
    decisions = [d.model_copy(update=update) if d.rule == rule else d
                 for d in manifest.loss.decisions]
    loss = manifest.loss.model_copy(update={"decisions": decisions})
    return manifest.model_copy(update={"loss": loss})


def test_same_manifest_has_no_changes(plain_run: PlainRun) -> None:
    assert decision_changes(plain_run.manifest, plain_run.manifest) == []


def test_rebuilt_from_the_same_statistics_has_no_changes(plain_run: PlainRun) -> None:
    from stats.manifest import build_manifest

    again = build_manifest(plain_run.stats, seed=0, created_at="2000-01-01T00:00:00+00:00")
    assert decision_changes(plain_run.manifest, again) == []


def test_changed_rule_outcome_is_named(plain_run: PlainRun) -> None:
    m = plain_run.manifest
    r2 = next(d for d in m.loss.decisions if d.rule == "R2")
    new = _with_decision(m, "R2", outcome="focal", fired=not r2.fired, params={"gamma": 2.0})
    changes = decision_changes(m, new)
    assert len(changes) == 1
    assert changes[0].startswith(f"R2 ({r2.title}): {r2.outcome}")
    assert "-> focal {gamma=2}" in changes[0]
    assert f"(fired: {r2.fired} -> {not r2.fired})" in changes[0]


def test_changed_transform_is_named_but_not_its_data_driven_offset(plain_run: PlainRun) -> None:
    m = plain_run.manifest
    key = next(iter(m.transforms))  # intensity/<channel>/brain: the transforms in use
    sel = m.transforms[key]
    other = "ln" if sel.chosen != "ln" else "identity"
    swapped = {**m.transforms, key: sel.model_copy(update={"chosen": other})}
    assert decision_changes(m, m.model_copy(update={"transforms": swapped})) == [
        f"transform {key}: {sel.chosen} -> {other}"]
    moved = {k: (s.model_copy(update={"params": {n: v * 1.5 for n, v in s.params.items()}}))
             for k, s in m.transforms.items()}
    assert decision_changes(m, m.model_copy(update={"transforms": moved})) == []


def test_rule_parameter_change_counts_below_noise_does_not(plain_run: PlainRun) -> None:
    # a decision with a float parameter (the calibrated rules may record none at this
    # size): give R1 one, then move it by noise and by a real amount
    m = _with_decision(plain_run.manifest, "R1", params={"probe": 0.5})
    d = next(d for d in m.loss.decisions if d.rule == "R1")
    name, value = "probe", 0.5
    noisy = _with_decision(m, d.rule, params={**d.params, name: value * (1 + 1e-12)})
    assert decision_changes(m, noisy) == []
    moved = _with_decision(m, d.rule, params={**d.params, name: value + 0.25})
    changes = decision_changes(m, moved)
    assert len(changes) == 1
    assert changes[0].startswith(f"{d.rule} ")
    assert math.isfinite(value)


def test_loss_terms_and_weighting(plain_run: PlainRun) -> None:
    m = plain_run.manifest
    terms = [t.model_copy(update={"weight": t.weight * 2}) for t in m.loss.terms]
    other = "softadapt" if m.loss.weighting.method != "softadapt" else "static"
    weighting = m.loss.weighting.model_copy(update={"method": other})
    new = m.model_copy(update={"loss": m.loss.model_copy(
        update={"terms": terms, "weighting": weighting})})
    changes = decision_changes(m, new)
    assert [c.split(":")[0] for c in changes] == ["loss terms", "weighting"]
    assert f"-> {other}" in changes[1]
