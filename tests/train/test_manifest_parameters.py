"""Issue 11, item 10: what ``xrai manifest validate`` accepts, the trainer accepts.

stats/ has no torch, so `stats.manifest` restates the constructors of the loss registry
and of the weightings as tables (`LOSS_PARAMETERS`, `WEIGHTING_PARAMETERS`). These tests
keep the tables equal to the constructor signatures (names, kinds, defaults, choices),
check which parameters the greedy adaptation can act on, and check the property that
every manifest `load_manifest` accepts loads in the trainer and builds its loss.
"""

from __future__ import annotations

import inspect
import json
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.manifest_io import load_manifest
from pipeline.train.benchmark import load_training_manifest
from pipeline.train.losses import LOSSES, build_loss
from pipeline.train.weighting import WEIGHTINGS, CoVWeighting, Rebalance, SoftAdapt, Static
from stats.errors import ManifestError
from stats.manifest import (
    LOSS_PARAMETERS,
    WEIGHTING_PARAMETERS,
    Manifest,
    ParamSpec,
    build_manifest,
)
from stats.rules import TERM_NAMES, WEIGHTING_METHODS
from tests.stats.test_rules import small_tumour_stats

WEIGHTING_CLASSES = {"static": Static, "rebalance": Rebalance, "softadapt": SoftAdapt,
                     "cov": CoVWeighting}


# ----------------------------------------------------------------------- signatures
def constructor_parameters(cls: type) -> dict[str, tuple[Any, Any]]:
    """Keyword name -> (type hint, default) of ``cls(...)``, following ``**kwargs`` up
    the MRO (the region losses pass them to ``_RegionLoss.__init__``)."""
    out: dict[str, tuple[Any, Any]] = {}
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or "__init__" not in vars(klass):
            continue
        init = vars(klass)["__init__"]
        hints = typing.get_type_hints(init)
        forwards = False
        for p in list(inspect.signature(init).parameters.values())[1:]:
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif p.name != "n_terms":   # the trainer fills in a weighting's n_terms
                out.setdefault(p.name, (hints[p.name], p.default))
        if not forwards:
            break
    return out


def manifest_kinds(hint: Any) -> tuple[set[str], tuple[str, ...]]:
    """The kinds (`ParamSpec.kind`) a manifest can write for a type hint, and the string
    choices of a Literal. ``None`` is written by omitting the parameter; a list of ints
    cannot be written (a manifest's lists are lists of floats)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds: set[str] = set()
        choices: tuple[str, ...] = ()
        for a in args:
            k, c = manifest_kinds(a)
            kinds |= k
            choices += c
        return kinds, choices
    if hint is type(None):
        return set(), ()
    if typing.get_origin(hint) is typing.Literal:
        assert all(isinstance(a, str) for a in args)
        return {"str"}, tuple(args)
    if hint in (bool, int, float, str):
        return {hint.__name__}, ()
    origin = typing.get_origin(hint)
    if origin is tuple or (isinstance(origin, type) and issubclass(origin, Sequence)):
        return ({"floats"} if set(args) <= {float, Ellipsis} else set()), ()
    raise AssertionError(f"no manifest kind for the type hint {hint!r}")


def assert_table_matches(owner: str, table: dict[str, ParamSpec], cls: type) -> None:
    params = constructor_parameters(cls)
    assert sorted(table) == sorted(params), owner
    for name, spec in table.items():
        hint, default = params[name]
        kinds, choices = manifest_kinds(hint)
        assert kinds == {spec.kind}, (owner, name, hint)
        assert tuple(choices) == spec.choices, (owner, name)
        assert spec.default == default, (owner, name, default)


def test_issue11_loss_table_equals_the_registry_constructors() -> None:
    assert sorted(LOSS_PARAMETERS) == sorted(TERM_NAMES) == sorted(set(LOSSES) - {"manifest"})
    for name, table in LOSS_PARAMETERS.items():
        assert_table_matches(f"loss {name!r}", dict(table), LOSSES[name])


def test_issue11_weighting_table_equals_the_weighting_constructors() -> None:
    assert sorted(WEIGHTING_PARAMETERS) == sorted(WEIGHTING_METHODS) == sorted(WEIGHTINGS)
    assert sorted(WEIGHTING_CLASSES) == sorted(WEIGHTINGS)
    for name, table in WEIGHTING_PARAMETERS.items():
        assert_table_matches(f"weighting {name!r}", dict(table), WEIGHTING_CLASSES[name])


def valid_sample(spec: ParamSpec) -> Any:
    """A value > 0 the constructor accepts for a float parameter."""
    if isinstance(spec.default, float) and spec.default > 0:
        return spec.default
    return 0.5   # inside every float range of the tables that has no positive default


@pytest.mark.parametrize("name", sorted(LOSS_PARAMETERS))
def test_issue11_adaptable_means_a_float_attribute_of_the_built_loss(name: str) -> None:
    # ManifestLoss's adaptation multiplies getattr(term, p) and requires a float
    for p, spec in LOSS_PARAMETERS[name].items():
        if spec.kind != "float":
            assert not spec.adaptable, (name, p)
            continue
        loss = build_loss({"name": name, p: valid_sample(spec)})
        value = getattr(loss, p, None)
        assert spec.adaptable == (isinstance(value, float) and not isinstance(value, bool)), (
            name, p, value)


# ----------------------------------------------------------------------- the property
BASE = json.loads(build_manifest(small_tumour_stats(np.random.default_rng(20261124)),
                                 created_at="2026-01-02T03:04:05+00:00").model_dump_json())
CHANNELS = list(BASE["dataset"]["channels"])

#: Values around every bound and default of the tables, and of every wrong kind.
VALUES = st.one_of(
    st.sampled_from([
        -1, -1e-9, 0, 0.0, 1e-5, 0.05, 0.3, 0.4, 0.5, 0.7, 0.999, 1, 1.0, 1.5, 2, 2.0, 2.5,
        3.0, 257, 1000, True, False, "mean", "sum", "none", "plain", "loss_weighted", "x",
        [], [0.5], [0.0, 2.0], [1.0, 1.0], [2.0, 0.5], [0.5, 1.5], [1.0, 2.0, 3.0],
        [-1.0, 1.0], [2, 2, 1],
    ]),
    st.floats(min_value=-3.0, max_value=300.0, allow_nan=False),
    st.integers(min_value=-2, max_value=300),
)
EXTRA_NAMES = ["smoth", "colour", "n_terms"]
LOSS_PARAM_NAMES = sorted({p for specs in LOSS_PARAMETERS.values() for p in specs}
                          | set(EXTRA_NAMES))
WEIGHTING_PARAM_NAMES = sorted({p for specs in WEIGHTING_PARAMETERS.values() for p in specs}
                               | set(EXTRA_NAMES))


def fitting(spec: ParamSpec, n_terms: int) -> st.SearchStrategy[Any]:
    """Values of the kind and range the table states (hypothesis tries the bounds)."""
    if spec.kind == "bool":
        return st.booleans()
    if spec.kind == "str":
        return st.sampled_from(spec.choices)
    low = spec.ge if spec.ge is not None else spec.gt
    high = 1 / n_terms if spec.le == "1/n_terms" else spec.le
    if spec.kind == "int":
        return st.integers(min_value=int(low or 0), max_value=int(low or 0) + 20)
    number = st.floats(min_value=-5.0 if low is None else low,
                       max_value=5.0 if high is None else high,
                       exclude_min=spec.gt is not None, allow_nan=False)
    if spec.kind == "float":
        return number
    n = n_terms if spec.n_items == "n_terms" else spec.n_items
    return st.lists(number, min_size=n or spec.min_items, max_size=n or spec.min_items + 2)


@st.composite
def params_for(draw: st.DrawFn, names: Sequence[str], specs: dict[str, ParamSpec],
               n_terms: int, hostile: bool) -> dict:
    """Up to 4 parameters of ``specs`` with fitting values; when ``hostile``, other names
    and values of any kind too."""
    params = {}
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        if specs and not (hostile and draw(st.booleans())):
            key = draw(st.sampled_from(sorted(specs)))
        else:
            key = draw(st.sampled_from(names))
        fit = key in specs and not (hostile and draw(st.booleans()))
        params[key] = draw(fitting(specs[key], n_terms) if fit else VALUES)
    return params


@st.composite
def loss_sections(draw: st.DrawFn, loss: str | None = None, method: str | None = None
                  ) -> dict:
    """A manifest's ``loss`` section: 1 to 3 terms (one of them ``loss`` when given), the
    weighting (``method`` when given), in half of the examples an adaptation; in half
    of them (``hostile``) with unknown names and values of any kind too."""
    hostile = draw(st.booleans())
    method = method or draw(st.sampled_from(sorted(WEIGHTING_PARAMETERS)))
    n_terms = (2 if method == "rebalance" and not hostile
               else draw(st.integers(min_value=1, max_value=3)))
    names = [draw(st.sampled_from(sorted(LOSS_PARAMETERS))) for _ in range(n_terms)]
    if loss is not None:
        names[draw(st.integers(min_value=0, max_value=n_terms - 1))] = loss
    terms = [{"name": name, "weight": draw(st.sampled_from([0.5, 1.0, 2.0])),
              "params": draw(params_for(LOSS_PARAM_NAMES, dict(LOSS_PARAMETERS[name]),
                                        n_terms, hostile)),
              "reason": "test"} for name in names]
    weighting = {"method": method, "reason": "test", "params": draw(
        params_for(WEIGHTING_PARAM_NAMES, dict(WEIGHTING_PARAMETERS[method]), n_terms,
                   hostile))}
    section = {"terms": terms, "weighting": weighting, "decisions": BASE["loss"]["decisions"]}
    if draw(st.booleans()):
        i = names.index(loss) if loss is not None else draw(
            st.integers(min_value=0, max_value=n_terms - 1))
        specs = LOSS_PARAMETERS[names[i]]
        adaptable = sorted(p for p, s in specs.items() if s.adaptable)
        if hostile or not adaptable:
            adaptable = [*sorted(specs), "gamma", "alpha", "step"]
        section["adaptation"] = {
            "method": "greedy", "term": i, "reason": "test",
            "params": draw(st.lists(st.sampled_from(adaptable), min_size=1, max_size=2,
                                    unique=not hostile)),
            "factors": draw(st.sampled_from([[0.9, 1.0, 1.1], [0.5, 2.0]])),
            "every": draw(st.integers(min_value=1, max_value=3))}
    return section


def accepted_manifests_build(section: dict, tmp_path: Path) -> None:
    """The property: if `load_manifest` accepts the manifest, the trainer loads it and
    builds its loss."""
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps({**BASE, "loss": section}), encoding="utf-8")
    try:
        manifest = load_manifest(p)             # `xrai manifest validate`
    except ManifestError:
        return                                   # rejected: nothing to promise
    # what `xrai train` does before training: load, build the loss, match the channels
    spec = load_training_manifest(p, CHANNELS).loss_spec
    loss_fn = build_loss(spec)                   # the run builds it again, per fold
    assert loss_fn.term_names == tuple(t.name for t in manifest.loss.terms)
    if manifest.loss.adaptation is not None:
        assert set(loss_fn.adapted_values()) == set(manifest.loss.adaptation.params)


PROPERTY = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@pytest.mark.parametrize("loss", sorted(LOSS_PARAMETERS))
@PROPERTY
@given(data=st.data())
def test_issue11_every_manifest_validate_accepts_builds_in_the_trainer(
        loss: str, data: st.DataObject, tmp_path: Path) -> None:
    accepted_manifests_build(data.draw(loss_sections(loss=loss)), tmp_path)


@pytest.mark.parametrize("method", sorted(WEIGHTING_PARAMETERS))
@PROPERTY
@given(data=st.data())
def test_issue11_every_weighting_validate_accepts_builds_in_the_trainer(
        method: str, data: st.DataObject, tmp_path: Path) -> None:
    accepted_manifests_build(data.draw(loss_sections(method=method)), tmp_path)


def two_terms(first: dict, **loss: Any) -> dict:
    """A loss section: ``first`` and a default focal term, static weighting, ``loss``
    keys."""
    terms = [first, {"name": "focal", "params": {}}]
    return {"terms": [{"weight": 1.0, "reason": "t", **t} for t in terms],
            "weighting": {"method": "static", "params": {}, "reason": "t"},
            "decisions": BASE["loss"]["decisions"], **loss}


def greedy(term: int, *params: str) -> dict:
    return {"method": "greedy", "term": term, "params": list(params), "reason": "t"}


@pytest.mark.parametrize(("section", "trainer_says"), [
    pytest.param(two_terms({"name": "dice", "params": {"smooth": math.nan}}),
                 r"smooth must be a finite number >= 0, got nan", id="nan"),
    pytest.param(two_terms({"name": "dice", "params": {"smoth": 1e-5}}),
                 r"unexpected keyword argument 'smoth'", id="unknown"),
    pytest.param(two_terms({"name": "focal", "params": {"alpha": 1.5}}),
                 r"alpha must be None or in \[0, 1\], got 1\.5", id="focal-alpha"),
    pytest.param(two_terms({"name": "focal_tversky", "params": {"gamma": 0.0}}),
                 r"gamma must be > 0, got 0\.0", id="focal_tversky-gamma"),
    pytest.param(two_terms({"name": "barron", "params": {"scale": 0.0}}),
                 r"scale must be a finite number > 0, got 0\.0", id="barron-scale"),
    pytest.param(two_terms({"name": "barron", "params": {"learnable": True, "alpha": 2.0}}),
                 r"learnable alpha must start strictly inside", id="barron-learnable-alpha"),
    pytest.param(two_terms({"name": "barron", "params": {"learnable": True}},
                           adaptation=greedy(0, "alpha")),
                 r"'alpha' is not a float parameter of terms\[0\]", id="adapt-learned-alpha"),
    pytest.param(two_terms({"name": "dice_ce", "params": {}}, adaptation=greedy(0, "smooth")),
                 r"'smooth' is not a float parameter of terms\[0\]", id="adapt-no-attribute"),
    pytest.param(two_terms({"name": "dice", "params": {"smooth": 0.0}},
                           adaptation=greedy(0, "smooth")),
                 r"cannot move a parameter that is not > 0", id="adapt-zero"),
    pytest.param(two_terms({"name": "tversky", "params": {}},
                           adaptation=greedy(0, "alpha", "alpha")),
                 r"names a parameter twice", id="adapt-twice"),
    # what a manifest holds for [2, 2, 1]: its parameter lists are lists of floats
    pytest.param(two_terms({"name": "adaptive_tversky",
                            "params": {"regions_per_axis": [2.0, 2.0, 1.0]}}),
                 r"regions_per_axis must be a positive int or ints", id="regions-list"),
    pytest.param(two_terms({"name": "wce", "params": {"weight": [1.0]}}),
                 r"weight must be None or a sequence of >= 2 class weights", id="wce-weight"),
    pytest.param(two_terms({"name": "dice", "params": {}}, weighting={
        "method": "static", "params": {"weights": [1.0, 1.0, 1.0]}, "reason": "t"}),
                 r"weights must be 2 finite numbers >= 0", id="static-weights"),
    pytest.param(two_terms({"name": "dice", "params": {}}, weighting={
        "method": "softadapt", "params": {"window": 1}, "reason": "t"}),
                 r"window must be an int >= 2, got 1", id="softadapt-window"),
    pytest.param(two_terms({"name": "dice", "params": {}}, weighting={
        "method": "cov", "params": {"min_weight": 0.6}, "reason": "t"}),
                 r"min_weight must be a number in \[0, 1/n_terms\]", id="cov-min_weight"),
])
def test_issue11_what_the_trainer_rejects_validate_rejects(section: dict, trainer_says: str,
                                                           tmp_path: Path) -> None:
    # the trainer: the manifest loss of this section does not build
    spec = {"name": "manifest",
            "terms": [{k: t[k] for k in ("name", "weight", "params")} for t in section["terms"]],
            "weighting": {k: section["weighting"][k] for k in ("method", "params")}}
    if "adaptation" in section:
        spec["adaptation"] = {k: v for k, v in section["adaptation"].items() if k != "reason"}
    with pytest.raises(ValueError, match=trainer_says):
        build_loss(spec)
    # `xrai manifest validate`: rejected, naming the file and a field of the loss
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps({**BASE, "loss": section}), encoding="utf-8")
    with pytest.raises(ManifestError, match=rf"^{p}: field loss\."):
        load_manifest(p)


def test_the_property_reaches_accepted_manifests() -> None:
    # the generator is not so hostile that every example is rejected: the base loss with
    # a full set of defaults, and one with an adaptation, are accepted and build
    for loss in (BASE["loss"],
                 {**BASE["loss"], "adaptation": {"method": "greedy", "term": 1,
                                                 "params": ["gamma"], "reason": "t"}}):
        m = Manifest.model_validate({**BASE, "loss": loss})
        assert isinstance(build_loss(m.loss_spec()), nn.Module)


@pytest.mark.parametrize("name", sorted(LOSS_PARAMETERS))
def test_issue11_the_table_defaults_build(name: str) -> None:
    params = {p: (list(s.default) if isinstance(s.default, tuple) else s.default)
              for p, s in LOSS_PARAMETERS[name].items() if s.default is not None}
    build_loss({"name": name, **params})


def test_issue11_the_trainer_names_the_file_for_a_rejected_manifest(tmp_path: Path) -> None:
    doc = json.loads(json.dumps(BASE))
    doc["loss"]["terms"][0]["params"]["smooth"] = math.nan
    p = tmp_path / "nan.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=rf"^{p}: field loss\.terms\.0\.params\.smooth: "
                                            r"not a finite number"):
        load_training_manifest(p, CHANNELS)
