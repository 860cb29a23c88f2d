"""Issue 11, item 10: `load_manifest` is the one check of ``xrai manifest validate`` and of
the trainer. Malformed files are rejected with a message that names the file and the
field (or the byte / line): non-finite numbers, loss and weighting parameters the
trainer's constructors reject, deep nesting, bytes that are not UTF-8, a directory, a
missing file. The agreement with the trainer itself is tested in
tests/train/test_manifest_parameters.py (it needs torch)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipeline.manifest_io import load_manifest, validate_command, write_manifest
from stats.errors import ManifestError
from stats.manifest import (
    LOSS_PARAMETERS,
    MAX_NESTING,
    Manifest,
    build_manifest,
)
from tests.stats.test_rules import small_tumour_stats

CREATED = "2026-01-02T03:04:05+00:00"


@pytest.fixture
def doc(rng: np.random.Generator) -> dict:
    """A valid manifest document: channels t1 and t2, terms dice + focal, static weights."""
    m = build_manifest(small_tumour_stats(rng), seed=7, created_at=CREATED)
    return json.loads(m.model_dump_json())


@pytest.fixture
def written(doc: dict, tmp_path: Path) -> Path:
    return write_manifest(Manifest.model_validate(doc), tmp_path / "manifest.json")


def write(tmp_path: Path, doc: dict, change: Callable[[dict], object] = lambda d: None,
          name: str = "m.json") -> Path:
    """``doc`` after ``change``, written with Python's json (which writes NaN, Infinity)."""
    change(doc)
    p = tmp_path / name
    p.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return p


def rejects(path: Path, message: str) -> str:
    """The ManifestError of loading ``path``; it starts with the file and matches."""
    with pytest.raises(ManifestError, match=message) as info:
        load_manifest(path)
    assert str(info.value).startswith(f"{path}: ")
    return str(info.value)


def test_the_fixture_is_valid(written: Path) -> None:
    m = load_manifest(written)
    assert [t.name for t in m.loss.terms] == ["dice", "focal"]


# ----------------------------------------------------------------------- non-finite
class TestNonFinite:
    @pytest.mark.parametrize(("change", "field", "token"), [
        (lambda d: d["loss"]["terms"][0]["params"].update(smooth=float("nan")),
         "loss.terms.0.params.smooth", "NaN"),
        (lambda d: d["normalization"]["t1"].update(mean=float("inf")),
         "normalization.t1.mean", "Infinity"),
        (lambda d: d["dataset"].update(voxel_ml=float("-inf")),
         "dataset.voxel_ml", "-Infinity"),
        (lambda d: d["loss"]["decisions"][0].update(measured=float("nan")),
         "loss.decisions.0.measured", "NaN"),   # NaN is written as null, never as NaN
    ])
    def test_issue11_nan_and_infinity_name_the_field(self, doc: dict, tmp_path: Path,
                                                     change, field: str, token: str) -> None:
        p = write(tmp_path, doc, change)
        assert token in p.read_text()    # Python's json writes (and reads) these tokens
        rejects(p, rf"field {re.escape(field)}: not a finite number; .* \(got {token}\)")

    def test_issue11_a_number_that_overflows_a_float(self, doc: dict, tmp_path: Path) -> None:
        # float("1e400") is inf: Python's json reads it as Infinity
        p = write(tmp_path, doc, lambda d: d["loss"]["terms"][1].update(weight="OVERFLOW"))
        p.write_text(p.read_text().replace('"OVERFLOW"', "1e400"))
        rejects(p, r"field loss\.terms\.1\.weight: not a finite number; .* \(got 1e400\)")

    def test_issue11_every_non_finite_number_is_listed(self, doc: dict,
                                                       tmp_path: Path) -> None:
        def two(d: dict) -> None:
            d["normalization"]["t2"]["std"] = float("nan")
            d["provenance"]["packages"] = {"numpy": float("inf")}
        msg = rejects(write(tmp_path, doc, two), r"field normalization\.t2\.std: ")
        assert "(and 1 more: field provenance.packages.numpy: not a finite number" in msg

    def test_null_still_reads_as_nan_where_the_schema_allows_it(self, doc: dict,
                                                                tmp_path: Path) -> None:
        p = write(tmp_path, doc, lambda d: d["loss"]["decisions"][0].update(measured=None))
        assert np.isnan(load_manifest(p).loss.decisions[0].measured)


# ----------------------------------------------------------------------- loss parameters
def term(d: dict, i: int) -> dict:
    return d["loss"]["terms"][i]


def set_terms(*terms: dict) -> Callable[[dict], None]:
    def change(d: dict) -> None:
        d["loss"]["terms"] = [{"reason": "test", **t} for t in terms]
    return change


class TestLossParameters:
    @pytest.mark.parametrize(("change", "message"), [
        # unknown names, with the registry's kind of suggestion
        (lambda d: term(d, 0)["params"].update(smoth=1e-5),
         r"field loss\.terms\.0\.params\.smoth: loss 'dice' has no parameter 'smoth'\. Did "
         r"you mean 'smooth'\? Its parameters: \['include_background', 'reduction', "
         r"'smooth'\] \(got 1e-05\)"),
        (lambda d: term(d, 1)["params"].update(colour="red"),
         r"field loss\.terms\.1\.params\.colour: loss 'focal' has no parameter 'colour'\. "
         r"Its parameters: \[.*'gamma'.*\] \(got 'red'\)"),
        # wrong kinds
        (lambda d: term(d, 0)["params"].update(include_background="yes"),
         r"field loss\.terms\.0\.params\.include_background: loss 'dice' takes "
         r"include_background as true or false \(got 'yes'\)"),
        (lambda d: term(d, 1)["params"].update(reduction="average"),
         r"field loss\.terms\.1\.params\.reduction: loss 'focal' takes reduction as one of "
         r"\['mean', 'sum', 'none'\] \(got 'average'\)"),
        (lambda d: term(d, 1)["params"].update(gamma=True),
         r"field loss\.terms\.1\.params\.gamma: loss 'focal' takes gamma as a finite number "
         r">= 0 \(got True\)"),
        (set_terms({"name": "barron", "params": {"table_size": 257.5}}),
         r"field loss\.terms\.0\.params\.table_size: loss 'barron' takes table_size as an "
         r"integer >= 2 \(got 257\.5\)"),
        # ranges the constructors check
        (lambda d: term(d, 1)["params"].update(alpha=1.5),
         r"field loss\.terms\.1\.params\.alpha: loss 'focal' takes alpha as a finite number "
         r"in \[0, 1\] \(got 1\.5\)"),
        (set_terms({"name": "tversky", "params": {"alpha": -0.1}}),
         r"field loss\.terms\.0\.params\.alpha: loss 'tversky' takes alpha as a finite "
         r"number >= 0 \(got -0\.1\)"),
        (set_terms({"name": "wce", "params": {"weight": [1.0]}}),
         r"field loss\.terms\.0\.params\.weight: loss 'wce' takes weight as a list of at "
         r"least 2 finite numbers, each >= 0 \(got \[1\.0\]\)"),
        (set_terms({"name": "adaptive_tversky", "params": {"regions_per_axis": [2, 2, 1]}}),
         # a manifest's lists are floats: the constructor would reject [2.0, 2.0, 1.0]
         r"field loss\.terms\.0\.params\.regions_per_axis: loss 'adaptive_tversky' takes "
         r"regions_per_axis as an integer >= 1 \(got \[2\.0, 2\.0, 1\.0\]\)"),
        (set_terms({"name": "barron", "params": {"alpha_range": [2.0, 1.0]}}),
         r"field loss\.terms\.0\.params\.alpha_range: loss 'barron' takes alpha_range as "
         r"\[lo, hi\] with 0 <= lo < hi \(got \[2\.0, 1\.0\]\)"),
        (set_terms({"name": "barron", "params": {"learnable": True, "alpha": 2.0}}),
         r"field loss\.terms\.0\.params\.alpha: loss 'barron' with learnable alpha takes "
         r"alpha strictly inside alpha_range \[0, 2\] \(got 2\.0\)"),
    ])
    def test_issue11_names_file_field_and_value(self, doc: dict, tmp_path: Path, change,
                                                message: str) -> None:
        rejects(write(tmp_path, doc, change), message)

    def test_issue11_every_bad_parameter_is_listed(self, doc: dict, tmp_path: Path) -> None:
        def two(d: dict) -> None:
            term(d, 0)["params"]["smoth"] = 0.0
            term(d, 1)["params"]["gamma"] = -1.0
        msg = rejects(write(tmp_path, doc, two), r"field loss\.terms\.0\.params\.smoth: ")
        assert "(and 1 more: field loss.terms.1.params.gamma: loss 'focal' takes" in msg

    def test_python_construction_is_checked_too(self, doc: dict) -> None:
        term(doc, 0)["params"]["smoth"] = 0.0
        with pytest.raises(ValueError, match=r"loss 'dice' has no parameter 'smoth'"):
            Manifest.model_validate(doc)

    def test_every_default_written_out_validates(self, doc: dict, tmp_path: Path) -> None:
        # the table's defaults are values the check accepts (the trainer test builds them)
        terms = [{"name": name, "params": {p: list(s.default) if isinstance(s.default, tuple)
                                           else s.default
                                           for p, s in specs.items() if s.default is not None}}
                 for name, specs in LOSS_PARAMETERS.items()]
        m = load_manifest(write(tmp_path, doc, set_terms(*terms)))
        assert [t.name for t in m.loss.terms] == list(LOSS_PARAMETERS)


class TestWeightingAndAdaptation:
    @pytest.mark.parametrize(("change", "message"), [
        (lambda d: d["loss"]["weighting"].update(params={"weigths": [1.0, 1.0]}),
         r"field loss\.weighting\.params\.weigths: weighting 'static' has no parameter "
         r"'weigths'\. Did you mean 'weights'\?"),
        (lambda d: d["loss"]["weighting"].update(params={"weights": [1.0, 1.0, 1.0]}),
         r"field loss\.weighting\.params\.weights: weighting 'static' takes weights as a list "
         r"of 2 finite numbers \(one per loss term\), each >= 0 \(got \[1\.0, 1\.0, 1\.0\]\)"),
        (lambda d: d["loss"]["weighting"].update(method="cov", params={"min_weight": 0.6}),
         r"field loss\.weighting\.params\.min_weight: weighting 'cov' takes min_weight as a "
         r"finite number in \[0, 0\.5\] \(got 0\.6\)"),
        (lambda d: d["loss"]["weighting"].update(method="softadapt", params={"window": 1}),
         r"field loss\.weighting\.params\.window: weighting 'softadapt' takes window as an "
         r"integer >= 2 \(got 1\)"),
        (lambda d: d["loss"].update(adaptation={"method": "greedy", "term": 0,
                                                "params": ["include_background"],
                                                "reason": "test"}),
         r"field loss\.adaptation\.params\.0: 'include_background' of terms\.0 \('dice'\) is "
         r"not a float parameter of loss 'dice' that can adapt; those are \['smooth'\] "
         r"\(got 'include_background'\)"),
        (lambda d: (term(d, 0)["params"].update(smooth=0.0),
                    d["loss"].update(adaptation={"method": "greedy", "term": 0,
                                                 "params": ["smooth"], "reason": "test"})),
         r"field loss\.adaptation\.params\.0: 'smooth' of terms\.0 \('dice'\) is 0\.0 in that "
         r"term; a multiplicative action cannot move a parameter that is not > 0"),
        (lambda d: d["loss"].update(adaptation={"method": "greedy", "term": 1,
                                                "params": ["gamma", "gamma"], "reason": "t"}),
         r"field loss\.adaptation\.params: names a parameter twice \(got \['gamma', "
         r"'gamma'\]\)"),
        (lambda d: d["loss"].update(adaptation={"method": "greedy", "term": 1,
                                                "params": ["alpha"], "reason": "t"}),
         # focal's alpha defaults to None: nothing to multiply
         r"field loss\.adaptation\.params\.0: 'alpha' of terms\.1 \('focal'\) is None in "
         r"that term; "),
    ])
    def test_issue11_names_file_field_and_value(self, doc: dict, tmp_path: Path, change,
                                                message: str) -> None:
        rejects(write(tmp_path, doc, change), message)


class TestNormalizationTransform:
    @pytest.mark.parametrize(("transform", "message"), [
        ({"name": "ln", "params": {}},
         r"transform 'ln' takes exactly the parameters \['offset'\], got \{\}"),
        ({"name": "identity", "params": {"offset": 1.0}},
         r"transform 'identity' takes exactly the parameters \[\], got \{'offset': 1\.0\}"),
        ({"name": "arcsin_sqrt", "params": {"scale": 0.0}},
         r"transform 'arcsin_sqrt': scale must be finite and > 0, got 0\.0"),
    ])
    def test_issue11_a_transform_the_trainer_cannot_rebuild(self, doc: dict, tmp_path: Path,
                                                            transform: dict,
                                                            message: str) -> None:
        # the trainer rebuilds it with stats.transforms.make_transform
        p = write(tmp_path, doc, lambda d: d["normalization"]["t2"].update(transform=transform))
        rejects(p, rf"field normalization\.t2\.transform: Value error, {message}")


# ----------------------------------------------------------------------- the file itself
class TestFile:
    def test_issue11_deep_nesting_is_not_a_recursion_error(self, tmp_path: Path) -> None:
        p = tmp_path / "deep.json"
        p.write_text("[" * 10_000 + "]" * 10_000)
        rejects(p, rf"JSON nested more than {MAX_NESTING} levels deep at line 1, column "
                   rf"{MAX_NESTING + 1}; ")

    def test_deep_nesting_is_reported_where_it_happens(self, doc: dict,
                                                       tmp_path: Path) -> None:
        p = write(tmp_path, doc)
        p.write_text(p.read_text() + "\n" + "[" * 10_000)  # after the document, line 2+
        line = p.read_text().count("\n") + 1
        rejects(p, rf"nested more than {MAX_NESTING} levels deep at line {line}, ")

    def test_brackets_inside_strings_are_not_nesting(self, doc: dict, tmp_path: Path) -> None:
        p = write(tmp_path, doc, lambda d: d["dataset"].update(name='[{\\"' * 100))
        assert load_manifest(p).dataset.name == '[{\\"' * 100

    def test_issue11_latin1_file_names_the_byte(self, doc: dict, tmp_path: Path) -> None:
        doc["dataset"]["name"] = "Müller"
        data = json.dumps(doc, ensure_ascii=False).encode("latin-1")
        p = tmp_path / "latin1.json"
        p.write_bytes(data)
        pos = data.index(b"\xfc")   # ü in latin-1; a UTF-8 ü would be two bytes
        rejects(p, rf"not UTF-8 text: byte b'\\xfc' at byte position {pos} \(line 1\) "
                   rf"cannot be decoded \(invalid start byte\); a manifest is UTF-8 JSON")

    def test_issue11_truncated_utf8_sequence(self, written: Path) -> None:
        data = written.read_bytes()
        cut = data.index(b'"synthetic"') + 1
        written.write_bytes(data[:cut] + b"\xe2\x82" + data[cut:])   # "€" lacking a byte
        line = data[:cut].count(b"\n") + 1
        rejects(written, rf"byte b'\\xe2' at byte position {cut} \(line {line}\) cannot be "
                         rf"decoded \(invalid continuation byte\)")

    def test_issue11_directory(self, tmp_path: Path) -> None:
        d = tmp_path / "manifests"
        d.mkdir()
        with pytest.raises(ManifestError, match=rf"manifest '{re.escape(str(d))}' is a "
                                                r"directory, not a file"):
            load_manifest(d)

    def test_issue11_missing_file(self, tmp_path: Path) -> None:
        p = tmp_path / "nope.json"
        with pytest.raises(FileNotFoundError, match=rf"manifest '{re.escape(str(p))}' does "
                                                    r"not exist"):
            validate_command(p)

    def test_an_integer_beyond_pythons_digit_limit_is_not_json(self, tmp_path: Path) -> None:
        p = tmp_path / "big.json"
        p.write_text('{"schema_version": ' + "9" * 5000 + "}")
        rejects(p, r"not valid JSON: ")


# ----------------------------------------------------------------------- the command
@pytest.mark.parametrize("kind", ["nan", "unknown parameter", "deep", "latin-1", "directory",
                                  "missing"])
def test_issue11_validate_command_exits_1_naming_the_file(doc: dict, tmp_path: Path,
                                                          kind: str) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    p = tmp_path / "m.json"
    if kind == "nan":
        write(tmp_path, doc, lambda d: d["normalization"]["t1"].update(std=float("nan")))
    elif kind == "unknown parameter":
        write(tmp_path, doc, lambda d: term(d, 1)["params"].update(gama=2.0))
    elif kind == "deep":
        p.write_text("{" * 10_000)
    elif kind == "latin-1":
        p.write_bytes('{"dataset": "Müller"}'.encode("latin-1"))
    elif kind == "directory":
        p.mkdir()
    result = CliRunner().invoke(app, ["manifest", "validate", str(p)])
    assert result.exit_code == 1, result.output
    assert str(p) in " ".join(result.output.split())  # rich may wrap the line
