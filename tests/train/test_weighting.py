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


def ls_slope(ys: list[float]) -> float:
    """Least-squares slope against 0..k-1, by numpy's polynomial fit (independent oracle)."""
    return float(np.polyfit(np.arange(len(ys)), ys, 1)[0]) if len(ys) > 1 else 0.0


def softadapt_oracle(
    history: list[list[float]], *, beta: float, window: int, normalize: bool, weighted: bool
) -> list[list[float]]:
    """Eq. 5.4 / 5.5 on polyfit slopes over the last ``window`` rows, written out plainly."""
    out = []
    for t in range(len(history)):
        rows = history[max(0, t + 1 - window) : t + 1]
        s = [ls_slope([r[i] for r in rows]) for i in range(len(history[0]))]
        if normalize:
            total = sum(abs(x) for x in s)
            s = [x / total if total > 0 else 0.0 for x in s]
        num = [math.exp(beta * x) * (history[t][i] if weighted else 1.0) for i, x in enumerate(s)]
        out.append([n / sum(num) for n in num])
    return out


class TestSoftAdapt:
    # window=2 and normalize=False is Heydari's original s_t = L_t - L_{t-1}: the two tests
    # below pin that limiting case (they were the old defaults)
    @pytest.mark.parametrize("beta", [0.0, 0.5, -2.0, 10.0])
    def test_plain_eq_5_4_first_difference(self, beta: float) -> None:
        sa = SoftAdapt(3, beta=beta, window=2, normalize=False)
        prev = None
        for values in HISTORY:
            got = sa.update(values)
            s = [0.0] * 3 if prev is None else [v - p for v, p in zip(values, prev, strict=True)]
            np.testing.assert_allclose(got, softmax([beta * x for x in s]), rtol=1e-12)
            prev = values

    @pytest.mark.parametrize("beta", [0.0, 0.5, -2.0])
    def test_loss_weighted_eq_5_5_first_difference(self, beta: float) -> None:
        sa = SoftAdapt(3, beta=beta, variant="loss_weighted", window=2, normalize=False)
        prev = None
        for values in HISTORY:
            got = sa.update(values)
            s = [0.0] * 3 if prev is None else [v - p for v, p in zip(values, prev, strict=True)]
            num = [v * math.exp(beta * x) for v, x in zip(values, s, strict=True)]
            np.testing.assert_allclose(got, [n / sum(num) for n in num], rtol=1e-12)
            prev = values

    def test_hand_computed_sequence(self) -> None:
        # window 3, beta 2, two terms. The least-squares slope of 3 equally spaced points
        # is (last - first) / 2; of 2 points, last - first.
        sa = SoftAdapt(2, beta=2.0, window=3)
        values = [[1.0, 2.0], [0.8, 2.0], [0.7, 2.0], [0.75, 1.9]]
        got = [sa.update(v) for v in values]
        e = math.exp
        expected = [
            (0.5, 0.5),  # step 1: no slope yet
            # step 2: s = (0.8 - 1.0, 0) = (-0.2, 0) -> normalized (-1, 0)
            (e(-2) / (e(-2) + 1), 1 / (e(-2) + 1)),
            # step 3: s = ((0.7 - 1.0) / 2, 0) = (-0.15, 0) -> normalized (-1, 0)
            (e(-2) / (e(-2) + 1), 1 / (e(-2) + 1)),
            # step 4: window [0.8, 0.7, 0.75] and [2.0, 2.0, 1.9]:
            # s = (-0.025, -0.05), sum |s| = 0.075 -> normalized (-1/3, -2/3)
            (e(-2 / 3) / (e(-2 / 3) + e(-4 / 3)), e(-4 / 3) / (e(-2 / 3) + e(-4 / 3))),
        ]
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        np.testing.assert_allclose(expected[3][0], 0.6607563687658172, rtol=1e-12)  # 1/(1+e^(-2/3))

    @pytest.mark.parametrize(
        ("beta", "window", "normalize", "weighted"),
        [(3.0, 5, True, False), (3.0, 3, True, True), (-1.5, 4, True, False),
         (0.7, 6, False, False), (5.0, 10, True, True)],
    )
    def test_matches_polyfit_oracle(
        self, beta: float, window: int, normalize: bool, weighted: bool
    ) -> None:
        sa = SoftAdapt(3, beta=beta, window=window, normalize=normalize,
                       variant="loss_weighted" if weighted else "plain")
        got = [sa.update(v) for v in HISTORY]
        expected = softadapt_oracle(HISTORY, beta=beta, window=window, normalize=normalize,
                                    weighted=weighted)
        np.testing.assert_allclose(got, expected, rtol=1e-12)

    def test_stalled_term_gains_weight(self) -> None:
        # the measured failure: a term stalled near 0.98 next to one that decreases; the
        # old SoftAdapt (beta 0.1 on raw step differences) kept both weights near 0.5
        rng = np.random.default_rng(3)
        steps = 200
        stalled = 0.98 + 1e-4 * rng.standard_normal(steps)
        falling = np.linspace(1.0, 0.2, steps) + 1e-4 * rng.standard_normal(steps)
        old = SoftAdapt(2, beta=0.1, window=2, normalize=False)
        new = SoftAdapt(2)
        w_old, w_new = [], []
        for a, b in zip(stalled, falling, strict=True):
            w_old.append(old.update([a, b])[0])
            w_new.append(new.update([a, b])[0])
        assert max(abs(w - 0.5) for w in w_old) < 0.01  # the failure as measured
        assert min(w_new[5:]) > 0.5 + 0.1
        # the falling slope, -0.8/199 per step, dwarfs the stalled term's noise: normalized
        # slopes near (0, -1), so w_0 near e^3 / (1 + e^3) = 0.953
        assert np.median(w_new[5:]) == pytest.approx(math.exp(3) / (1 + math.exp(3)), abs=0.02)

    @pytest.mark.parametrize("variant", ["plain", "loss_weighted"])
    def test_common_scale_does_not_change_normalized_weights(self, variant: str) -> None:
        a = SoftAdapt(3, variant=variant)  # type: ignore[arg-type]
        b = SoftAdapt(3, variant=variant)  # type: ignore[arg-type]
        for values in HISTORY:
            wa = a.update(values)
            wb = b.update([1000.0 * v for v in values])
            np.testing.assert_allclose(wb, wa, rtol=1e-9)

    def test_offset_of_one_term_does_not_change_plain_weights(self) -> None:
        a, b = SoftAdapt(3), SoftAdapt(3)
        for values in HISTORY:
            np.testing.assert_allclose(b.update([values[0] + 5.0, *values[1:]]),
                                       a.update(values), rtol=1e-9)

    def test_scaling_one_term_changes_the_weights(self) -> None:
        # What is *not* invariant: scaling one term changes its share of sum |s_j|
        # (step 2: s = (-0.1, -0.5, 0.05); times 1000 on term 0: (-100, -0.5, 0.05)).
        a, b = SoftAdapt(3), SoftAdapt(3)
        for values in HISTORY[:2]:
            wa = a.update(values)
            wb = b.update([1000.0 * values[0], *values[1:]])
        s = [-100.0, -0.5, 0.05]
        expected = softmax([3.0 * x / sum(abs(v) for v in s) for x in s])
        np.testing.assert_allclose(wb, expected, rtol=1e-9)
        assert abs(wb[0] - wa[0]) > 0.05

    def test_unnormalized_weights_depend_on_scale(self) -> None:
        a, b = SoftAdapt(3, normalize=False), SoftAdapt(3, normalize=False)
        for values in HISTORY[:3]:
            wa = a.update(values)
            wb = b.update([1000.0 * v for v in values])
        assert not np.allclose(wa, wb)

    @pytest.mark.parametrize("normalize", [True, False])
    def test_beta_zero_gives_equal_weights(self, normalize: bool) -> None:
        sa = SoftAdapt(3, beta=0.0, normalize=normalize)
        for values in HISTORY:
            np.testing.assert_allclose(sa.update(values), [1 / 3] * 3, rtol=1e-12)

    def test_loss_weighted_beta_zero_is_proportional_to_the_values(self) -> None:
        sa = SoftAdapt(3, beta=0.0, variant="loss_weighted")
        for values in HISTORY:
            np.testing.assert_allclose(sa.update(values), np.array(values) / sum(values),
                                       rtol=1e-12)

    def test_flat_losses_give_equal_weights(self) -> None:
        sa = SoftAdapt(2)
        for _ in range(4):
            w = sa.update([0.5, 2.0])
        assert w == (0.5, 0.5)  # every slope 0: normalized slopes 0

    def test_large_beta_is_stable(self) -> None:
        sa = SoftAdapt(2, beta=1e4)
        sa.update([1.0, 1.0])
        w = sa.update([2.0, 1.0])  # exp(1e4) would overflow without the max shift
        np.testing.assert_allclose(w, [1.0, 0.0], atol=1e-12)

    def test_history_keeps_the_window(self) -> None:
        sa = SoftAdapt(3, window=4)
        for values in HISTORY:
            sa.update(values)
        assert sa.history == HISTORY[-4:]
        assert sa.step == len(HISTORY)

    def test_loss_weighted_rejects_negative(self) -> None:
        with pytest.raises(ValueError, match=r"component value 1 must be >= 0"):
            SoftAdapt(2, variant="loss_weighted").update([1.0, -0.5])

    def test_unknown_variant(self) -> None:
        with pytest.raises(
            ValueError, match=r"variant must be 'plain' or 'loss_weighted', got 'both'"
        ):
            SoftAdapt(2, variant="both")  # type: ignore[arg-type]

    @pytest.mark.parametrize("window", [1, 0, 2.5, True])
    def test_bad_window(self, window: object) -> None:
        with pytest.raises(ValueError, match=r"window must be an int >= 2, got "):
            SoftAdapt(2, window=window)  # type: ignore[arg-type]

    def test_bad_normalize(self) -> None:
        with pytest.raises(ValueError, match=r"normalize must be True or False, got 'yes'"):
            SoftAdapt(2, normalize="yes")  # type: ignore[arg-type]


class TestCoV:
    def test_welford_matches_numpy_history(self) -> None:
        # min_weight=0: Groenendijk et al.'s eq. 5.8 exactly (this was the default before
        # the floor was added; the test documents that plain weighting)
        cov = CoVWeighting(3, min_weight=0.0)
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

    def test_floor_hand_computed_three_steps(self) -> None:
        # Three terms, default floor f = 0.5 / 3 = 1/6, so w_i = 1/6 + 0.5 c_i / sum c.
        # Term A is constant (c = 0). Term B: 2, 1, 3. Term C: 1, 2, 2.
        cov = CoVWeighting(3)
        got = [cov.update(v) for v in ([1.0, 2.0, 1.0], [1.0, 1.0, 2.0], [1.0, 3.0, 2.0])]
        # step 2: ratios B [1, 1/2] (1 / mean(2)), C [1, 2] (2 / mean(1)):
        # c_B = 0.25 / 0.75 = 1/3, c_C = 0.5 / 1.5 = 1/3 -> B and C share 0.5 equally
        # step 3: B's ratio 3 / mean(2, 1) = 2, ratios [1, 1/2, 2]: mean 7/6, variance
        # (1/36 + 16/36 + 25/36) / 3 = 7/18; C's ratio 2 / mean(1, 2) = 4/3, ratios
        # [1, 2, 4/3]: mean 13/9, variance ((4/9)^2 + (5/9)^2 + (1/9)^2) / 3 = 42/243
        c_b = math.sqrt(7 / 18) / (7 / 6)
        c_c = math.sqrt(42 / 243) / (13 / 9)
        expected = [
            (1 / 3, 1 / 3, 1 / 3),  # step 1: every c = 0
            (1 / 6, 1 / 6 + 0.25, 1 / 6 + 0.25),
            (1 / 6, 1 / 6 + 0.5 * c_b / (c_b + c_c), 1 / 6 + 0.5 * c_c / (c_b + c_c)),
        ]
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        # closed form: c_B = (6/7) sqrt(7/18) = sqrt(14)/7, c_C = (9/13) sqrt(42/243) =
        # sqrt(14)/13, so B and C split 0.5 as 13/20 : 7/20
        np.testing.assert_allclose(got[2], [1 / 6, 1 / 6 + 0.325, 1 / 6 + 0.175], rtol=1e-12)

    def test_stalled_term_keeps_the_floor(self) -> None:
        rng = np.random.default_rng(11)
        cov = CoVWeighting(3)
        for t in range(60):
            w = cov.update([0.98, float(rng.uniform(0.1, 2.0)), 1.0 / (t + 1)])
            assert sum(w) == pytest.approx(1.0, rel=1e-12)
            assert min(w) >= 0.5 / 3 - 1e-15
            if t > 0:
                assert w[0] == pytest.approx(0.5 / 3, rel=1e-12)  # c = 0: exactly the floor

    @pytest.mark.parametrize("floor", [0.0, 0.1, 0.25])
    def test_weights_sum_to_one_and_respect_any_floor(self, floor: float) -> None:
        cov = CoVWeighting(4, min_weight=floor)
        rng = np.random.default_rng(5)
        for _ in range(20):
            w = cov.update(list(rng.uniform(0.1, 3.0, 4)))
            assert sum(w) == pytest.approx(1.0, rel=1e-12)
            assert min(w) >= floor - 1e-15

    def test_floor_of_one_over_n_is_static(self) -> None:
        cov = CoVWeighting(4, min_weight=0.25)
        for values in HISTORY:
            w = cov.update([*values, 1.0])
        np.testing.assert_allclose(w, [0.25] * 4, rtol=1e-12)

    @pytest.mark.parametrize("floor", [-0.1, 0.6, float("nan"), True])
    def test_bad_floor(self, floor: object) -> None:
        with pytest.raises(ValueError, match=r"min_weight must be a number in \[0, 1/n_terms\]"):
            CoVWeighting(2, min_weight=floor)  # type: ignore[arg-type]

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
