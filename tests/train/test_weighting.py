"""Tests of pipeline.train.weighting against hand-computed sequences (thesis eq. 5.3-5.11)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.train.weighting import (
    CoVWeighting,
    Rebalance,
    SoftAdapt,
    Static,
    build_weighting,
)

# loss values of three terms over six steps (made up, positive, varied)
HISTORY = [
    [0.90, 2.00, 0.50],
    [0.80, 1.50, 0.55],
    [0.75, 1.40, 0.40],
    [0.60, 1.45, 0.42],
    [0.58, 1.00, 0.30],
    [0.50, 0.95, 0.33],
]


def softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


class TestStatic:
    def test_returns_its_weights(self) -> None:
        w = Static(2, weights=[0.3, 1.7])
        assert w.update([1.0, 2.0]) == (0.3, 1.7)
        assert w.update([5.0, 0.0]) == (0.3, 1.7)
        assert w.step == 2

    def test_default_ones(self) -> None:
        assert Static(3).update([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)

    def test_wrong_count(self) -> None:
        with pytest.raises(ValueError, match=r"weights must be 2 finite numbers >= 0"):
            Static(2, weights=[1.0])


class TestRebalance:
    def test_linear_schedule_endpoints(self) -> None:
        r = Rebalance(alpha_start=1.0, alpha_end=0.2, steps=5)
        got = [r.update([1.0, 1.0])[0] for _ in range(7)]
        # a_t = 1 + (0.2 - 1) * min((t-1)/4, 1): 1.0, 0.8, 0.6, 0.4, 0.2, then constant
        np.testing.assert_allclose(got, [1.0, 0.8, 0.6, 0.4, 0.2, 0.2, 0.2], rtol=0, atol=1e-12)
        np.testing.assert_allclose(sum(r.weights), 1.0, rtol=1e-12)

    def test_two_terms_only(self) -> None:
        with pytest.raises(ValueError, match=r"rebalance weighs exactly 2 terms, got n_terms=3"):
            build_weighting("rebalance", 3)


class TestSoftAdapt:
    @pytest.mark.parametrize("beta", [0.0, 0.5, -2.0, 10.0])
    def test_plain_eq_5_4(self, beta: float) -> None:
        sa = SoftAdapt(3, beta=beta)
        prev = None
        for values in HISTORY:
            got = sa.update(values)
            s = [0.0] * 3 if prev is None else [v - p for v, p in zip(values, prev, strict=True)]
            np.testing.assert_allclose(got, softmax([beta * x for x in s]), rtol=1e-12)
            prev = values

    @pytest.mark.parametrize("beta", [0.0, 0.5, -2.0])
    def test_loss_weighted_eq_5_5(self, beta: float) -> None:
        sa = SoftAdapt(3, beta=beta, variant="loss_weighted")
        prev = None
        for values in HISTORY:
            got = sa.update(values)
            s = [0.0] * 3 if prev is None else [v - p for v, p in zip(values, prev, strict=True)]
            num = [v * math.exp(beta * x) for v, x in zip(values, s, strict=True)]
            np.testing.assert_allclose(got, [n / sum(num) for n in num], rtol=1e-12)
            prev = values

    def test_large_beta_is_stable(self) -> None:
        sa = SoftAdapt(2, beta=1e4)
        sa.update([1.0, 1.0])
        w = sa.update([2.0, 1.0])  # exp(1e4) would overflow without the max shift
        np.testing.assert_allclose(w, [1.0, 0.0], atol=1e-12)

    def test_loss_weighted_rejects_negative(self) -> None:
        with pytest.raises(ValueError, match=r"component value 1 must be >= 0"):
            SoftAdapt(2, variant="loss_weighted").update([1.0, -0.5])

    def test_unknown_variant(self) -> None:
        with pytest.raises(
            ValueError, match=r"variant must be 'plain' or 'loss_weighted', got 'both'"
        ):
            SoftAdapt(2, variant="both")  # type: ignore[arg-type]


class TestCoV:
    def test_welford_matches_numpy_history(self) -> None:
        cov = CoVWeighting(3)
        losses = np.array(HISTORY)
        ratios = np.ones_like(losses)  # l_1 = 1
        for t in range(1, len(HISTORY)):
            ratios[t] = losses[t] / losses[:t].mean(axis=0)  # eq. 5.7 with the exact running mean
        for t, values in enumerate(HISTORY, start=1):
            got = cov.update(values)
            np.testing.assert_allclose(cov.mean_loss, losses[:t].mean(axis=0), rtol=1e-12)
            np.testing.assert_allclose(cov.mean_ratio, ratios[:t].mean(axis=0), rtol=1e-12)
            std = ratios[:t].std(axis=0)  # population std (ddof=0): M_l of eq. 5.11
            np.testing.assert_allclose(cov.std_ratio, std, rtol=1e-9, atol=1e-15)
            c = std / ratios[:t].mean(axis=0)
            expected = c / c.sum() if c.sum() > 0 else np.full(3, 1 / 3)
            np.testing.assert_allclose(got, expected, rtol=1e-9)

    def test_first_step_uniform(self) -> None:
        assert CoVWeighting(2).update([3.0, 0.1]) == (0.5, 0.5)

    def test_constant_losses_stay_uniform(self) -> None:
        cov = CoVWeighting(2)
        for _ in range(4):
            w = cov.update([1.0, 2.0])
        np.testing.assert_allclose(w, [0.5, 0.5])

    def test_rejects_negative(self) -> None:
        with pytest.raises(ValueError, match=r"component value 0 must be >= 0"):
            CoVWeighting(2).update([-1.0, 1.0])


class TestBuild:
    @pytest.mark.parametrize("method", ["static", "softadapt", "cov"])
    def test_builds_each(self, method: str) -> None:
        w = build_weighting(method, 2)
        assert len(w.update([1.0, 2.0])) == 2

    def test_unknown(self) -> None:
        with pytest.raises(ValueError, match=r"unknown weighting method 'soft'"):
            build_weighting("soft", 2)

    def test_bad_params(self) -> None:
        with pytest.raises(ValueError, match=r"weighting 'cov': bad parameters \{'beta': 1.0\}"):
            build_weighting("cov", 2, {"beta": 1.0})

    def test_wrong_number_of_values(self) -> None:
        with pytest.raises(ValueError, match=r"expected 2 component values, got 3"):
            build_weighting("softadapt", 2).update([1.0, 2.0, 3.0])
