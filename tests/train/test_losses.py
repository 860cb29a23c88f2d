"""Tests of pipeline.train.losses: each loss against a naive formula written here,
limiting-case identities, both activation paths, gradients, and the registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt

from pipeline.train.losses import (
    LOSSES,
    adaptive_tversky_weights,
    barron_rho,
    build_loss,
    register_loss,
    signed_distance_map,
)
from pipeline.train.losses.robust import log_partition_table

EPS = 1e-5  # the smoothing constant of the region convention


def random_case(channels: int, seed: int = 0, shape: tuple[int, ...] = (2, 6, 5)):
    """Logits and a binary (C = 1) or one-hot (C > 1) float target, float64."""
    g = torch.Generator().manual_seed(seed)
    n, *spatial = shape
    logits = torch.randn(n, channels, *spatial, generator=g, dtype=torch.float64)
    if channels == 1:
        target = (torch.rand(n, 1, *spatial, generator=g) > 0.6).double()
    else:
        labels = torch.randint(0, channels, (n, *spatial), generator=g)
        target = torch.nn.functional.one_hot(labels, channels).movedim(-1, 1).double()
    return logits, target


def naive_probs(logits: torch.Tensor) -> torch.Tensor:
    return (
        1 / (1 + torch.exp(-logits))
        if logits.shape[1] == 1
        else (torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True))
    )


def naive_counts(p: torch.Tensor, g: torch.Tensor):
    """Per-channel soft TP, FP, FN with explicit loops over channels."""
    out = []
    for c in range(p.shape[1]):
        pc, gc = p[:, c].flatten(), g[:, c].flatten()
        out.append(((pc * gc).sum(), (pc * (1 - gc)).sum(), ((1 - pc) * gc).sum()))
    return out


CHANNELS = [1, 3]  # sigmoid path and softmax path


class TestRegionAgainstNaive:
    @pytest.mark.parametrize("channels", CHANNELS)
    def test_dice(self, channels: int) -> None:
        logits, target = random_case(channels)
        p = naive_probs(logits)
        expected = np.mean(
            [
                1 - (2 * tp + EPS) / (2 * tp + fp + fn + EPS)
                for tp, fp, fn in naive_counts(p, target)
            ]
        )
        torch.testing.assert_close(
            build_loss({"name": "dice"})(logits, target).item(), float(expected)
        )

    @pytest.mark.parametrize("channels", CHANNELS)
    def test_iou(self, channels: int) -> None:
        logits, target = random_case(channels)
        p = naive_probs(logits)
        expected = np.mean(
            [1 - (tp + EPS) / (tp + fp + fn + EPS) for tp, fp, fn in naive_counts(p, target)]
        )
        torch.testing.assert_close(
            build_loss({"name": "iou"})(logits, target).item(), float(expected)
        )

    @pytest.mark.parametrize("channels", CHANNELS)
    def test_tversky(self, channels: int) -> None:
        logits, target = random_case(channels)
        p = naive_probs(logits)
        a, b = 0.2, 0.8
        expected = np.mean(
            [
                1 - (tp + EPS) / (tp + a * fp + b * fn + EPS)
                for tp, fp, fn in naive_counts(p, target)
            ]
        )
        loss = build_loss({"name": "tversky", "alpha": a, "beta": b})
        torch.testing.assert_close(loss(logits, target).item(), float(expected))

    @pytest.mark.parametrize("channels", CHANNELS)
    def test_focal_tversky(self, channels: int) -> None:
        logits, target = random_case(channels)
        p = naive_probs(logits)
        a, b, gamma = 0.3, 0.7, 4 / 3
        expected = np.mean(
            [
                (1 - (tp + EPS) / (tp + a * fp + b * fn + EPS)) ** (1 / gamma)
                for tp, fp, fn in naive_counts(p, target)
            ]
        )
        loss = build_loss({"name": "focal_tversky", "alpha": a, "beta": b, "gamma": gamma})
        torch.testing.assert_close(loss(logits, target).item(), float(expected))

    @pytest.mark.parametrize("channels", CHANNELS)
    def test_asymmetric(self, channels: int) -> None:
        logits, target = random_case(channels)
        p = naive_probs(logits)
        b2 = 1.5**2
        expected = np.mean(
            [
                1 - ((1 + b2) * tp + EPS) / ((1 + b2) * tp + fp + b2 * fn + EPS)
                for tp, fp, fn in naive_counts(p, target)
            ]
        )
        torch.testing.assert_close(
            build_loss({"name": "asymmetric", "beta": 1.5})(logits, target).item(), float(expected)
        )

    @pytest.mark.parametrize("channels", CHANNELS)
    def test_generalized_dice(self, channels: int) -> None:
        logits, target = random_case(channels)
        p = naive_probs(logits)
        w = [
            1 / target[:, c].sum().item() ** 2 for c in range(channels)
        ]  # Sudre's squared inverse volume
        counts = naive_counts(p, target)
        num = 2 * sum(wc * tp for wc, (tp, _, _) in zip(w, counts, strict=True)) + EPS
        den = sum(wc * (2 * tp + fp + fn) for wc, (tp, fp, fn) in zip(w, counts, strict=True)) + EPS
        torch.testing.assert_close(
            build_loss({"name": "generalized_dice"})(logits, target).item(), float(1 - num / den)
        )

    def test_include_background_false_drops_channel_zero(self) -> None:
        logits, target = random_case(3)
        p = naive_probs(logits)
        per = [
            1 - (2 * tp + EPS) / (2 * tp + fp + fn + EPS) for tp, fp, fn in naive_counts(p, target)
        ]
        loss = build_loss({"name": "dice", "include_background": False, "reduction": "none"})
        torch.testing.assert_close(loss(logits, target), torch.tensor(per[1:], dtype=torch.float64))

    @pytest.mark.parametrize(
        "name",
        [
            "dice",
            "iou",
            "tversky",
            "focal_tversky",
            "asymmetric",
            "generalized_dice",
            "adaptive_tversky",
        ],
    )
    @pytest.mark.parametrize("channels", CHANNELS)
    def test_perfect_prediction_is_near_zero(self, name: str, channels: int) -> None:
        _, target = random_case(channels)
        logits = (2 * target - 1) * 40.0  # saturated: probabilities equal the target to 1e-17
        assert build_loss({"name": name})(logits, target).item() < 1e-6


class TestLimitingCases:
    @pytest.mark.parametrize("channels", CHANNELS)
    def test_tversky_half_half_is_dice(self, channels: int) -> None:
        logits, target = random_case(channels, seed=1)
        # smoothing off: equal smoothing would not cancel (Dice's ratio has 2 TP)
        tversky = build_loss({"name": "tversky", "alpha": 0.5, "beta": 0.5, "smooth": 0.0})(
            logits, target
        )
        torch.testing.assert_close(
            tversky, build_loss({"name": "dice", "smooth": 0.0})(logits, target)
        )

    @pytest.mark.parametrize("channels", CHANNELS)
    def test_tversky_one_one_is_iou(self, channels: int) -> None:
        logits, target = random_case(channels, seed=1)
        tversky = build_loss({"name": "tversky", "alpha": 1.0, "beta": 1.0})(logits, target)
        torch.testing.assert_close(tversky, build_loss({"name": "iou"})(logits, target))

    @pytest.mark.parametrize("channels", CHANNELS)
    def test_focal_tversky_gamma_one_is_tversky(self, channels: int) -> None:
        logits, target = random_case(channels, seed=2)
        ft = build_loss({"name": "focal_tversky", "alpha": 0.4, "beta": 0.6, "gamma": 1.0})(
            logits, target
        )
        torch.testing.assert_close(
            ft, build_loss({"name": "tversky", "alpha": 0.4, "beta": 0.6})(logits, target)
        )

    @pytest.mark.parametrize("channels", CHANNELS)
    def test_asymmetric_is_tversky_with_alpha_plus_beta_one(self, channels: int) -> None:
        logits, target = random_case(channels, seed=3)
        b2 = 2.0**2  # thesis eq. 3.22 vs 3.20: alpha = 1/(1+b^2), beta = b^2/(1+b^2), smoothing off
        asym = build_loss({"name": "asymmetric", "beta": 2.0, "smooth": 0.0})(logits, target)
        tv = build_loss(
            {"name": "tversky", "alpha": 1 / (1 + b2), "beta": b2 / (1 + b2), "smooth": 0.0}
        )
        torch.testing.assert_close(asym, tv(logits, target))

    @pytest.mark.parametrize("channels", CHANNELS)
    def test_focal_gamma_zero_is_cross_entropy(self, channels: int) -> None:
        logits, target = random_case(channels, seed=4)
        focal = build_loss({"name": "focal", "gamma": 0.0})(logits, target)
        torch.testing.assert_close(focal, build_loss({"name": "bce"})(logits, target))

    @pytest.mark.parametrize("channels", CHANNELS)
    def test_adaptive_tversky_without_errors_weights_is_tversky(self, channels: int) -> None:
        # A = 0.5, B = 0: alpha = beta = 0.5 whatever FP/FN are -> Dice
        logits, target = random_case(channels, seed=5)
        adaptive = build_loss({"name": "adaptive_tversky", "A": 0.5, "B": 0.0, "smooth": 0.0})
        torch.testing.assert_close(
            adaptive(logits, target), build_loss({"name": "dice", "smooth": 0.0})(logits, target)
        )


class TestDistributionAgainstNaive:
    def test_bce_sigmoid(self) -> None:
        logits, target = random_case(1)
        p = naive_probs(logits)
        expected = -(
            target * torch.log(p) + (1 - target) * torch.log(1 - p)
        ).mean()  # thesis eq. 3.8
        torch.testing.assert_close(build_loss({"name": "bce"})(logits, target), expected)

    def test_ce_softmax_matches_torch(self) -> None:
        logits, target = random_case(3)
        expected = torch.nn.functional.cross_entropy(
            logits, target.argmax(dim=1)
        )  # independent oracle
        torch.testing.assert_close(build_loss({"name": "bce"})(logits, target), expected)

    @pytest.mark.parametrize("channels", CHANNELS)
    def test_focal(self, channels: int) -> None:
        logits, target = random_case(channels)
        p = naive_probs(logits)
        gamma = 2.0
        if channels == 1:
            p_t = torch.where(target > 0.5, p, 1 - p)
            expected = (-((1 - p_t) ** gamma) * torch.log(p_t)).mean()
        else:
            expected = (-(target * (1 - p) ** gamma * torch.log(p)).sum(dim=1)).mean()
        torch.testing.assert_close(
            build_loss({"name": "focal", "gamma": gamma})(logits, target), expected
        )

    def test_focal_sigmoid_matches_monai(self) -> None:
        from monai.losses import FocalLoss as MonaiFocal

        logits, target = random_case(1)
        ours = build_loss({"name": "focal", "gamma": 2.0, "alpha": 0.25})(logits, target)
        torch.testing.assert_close(ours, MonaiFocal(gamma=2.0, alpha=0.25)(logits, target).double())

    def test_focal_softmax_is_monai_times_channels(self) -> None:
        # pins the documented difference: MONAI averages over channels too
        from monai.losses import FocalLoss as MonaiFocal

        logits, target = random_case(3)
        ours = build_loss({"name": "focal", "gamma": 2.0})(logits, target)
        theirs = MonaiFocal(gamma=2.0, use_softmax=True)(logits, target)
        torch.testing.assert_close(ours, 3 * theirs.double())

    @pytest.mark.parametrize("channels", CHANNELS)
    def test_wce_explicit_weights(self, channels: int) -> None:
        logits, target = random_case(channels)
        p = naive_probs(logits)
        if channels == 1:
            w = (0.3, 2.0)
            expected = -(
                w[1] * target * torch.log(p) + w[0] * (1 - target) * torch.log(1 - p)
            ).mean()
        else:
            w = (0.5, 1.0, 3.0)
            wt = torch.tensor(w, dtype=torch.float64).view(1, 3, 1, 1)
            expected = (
                -(wt * target * torch.log(p)).sum(dim=1).mean()
            )  # seed 003: (1/N) sum_i sum_c w_c g log s
        torch.testing.assert_close(
            build_loss({"name": "wce", "weight": w})(logits, target), expected
        )

    def test_wce_default_weights_are_inverse_frequency(self) -> None:
        logits, target = random_case(3)
        freq = target.sum(dim=(0, 2, 3)) / target[:, 0].numel()
        inv = 1 / freq
        w = tuple((inv / inv.mean()).tolist())
        auto = build_loss({"name": "wce"})(logits, target)
        torch.testing.assert_close(
            auto, build_loss({"name": "wce", "weight": w})(logits, target), rtol=1e-4, atol=0
        )

    def test_wce_weight_count_mismatch(self) -> None:
        logits, target = random_case(3)
        with pytest.raises(ValueError, match=r"wce has 2 class weights .* 3 classes"):
            build_loss({"name": "wce", "weight": [1.0, 2.0]})(logits, target)


class TestAdaptiveTversky:
    def test_weights_follow_fp_fn(self) -> None:
        # one channel, hard prediction: FP = 1 voxel, FN = 3 voxels
        target = torch.tensor([[[[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]]]])
        probs = torch.tensor([[[[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]]]])
        logits = torch.logit(probs.clamp(1e-12, 1 - 1e-12)).double()
        loss = build_loss({"name": "adaptive_tversky", "A": 0.3, "B": 0.4, "smooth": 0.0})
        alpha, beta = loss.weights(logits, target.double())
        torch.testing.assert_close(alpha.item(), 0.3 + 0.4 * 1 / 4)
        torch.testing.assert_close(beta.item(), 0.3 + 0.4 * 3 / 4)
        tp = 1.0  # 1 - (TP)/(TP + a FP + b FN) with the adapted weights
        expected = 1 - tp / (tp + 0.4 * 1 + 0.6 * 3)
        torch.testing.assert_close(loss(logits, target.double()).item(), expected)

    def test_no_errors_gives_symmetric_weights(self) -> None:
        a, b = adaptive_tversky_weights(torch.zeros(2), torch.zeros(2), A=0.3, B=0.4)
        torch.testing.assert_close(a, torch.full((2,), 0.5))
        torch.testing.assert_close(b, torch.full((2,), 0.5))

    def test_regions_average_per_block(self) -> None:
        logits, target = random_case(1, shape=(2, 4, 6))
        p = naive_probs(logits)
        losses = []
        for i in range(2):
            for j in range(3):  # 2 x 3 blocks of 2 x 2 voxels
                pb, gb = (
                    p[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2],
                    target[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2],
                )
                tp, fp, fn = (pb * gb).sum(), (pb * (1 - gb)).sum(), ((1 - pb) * gb).sum()
                a = 0.3 + 0.4 * (fp + EPS / 2) / (fp + fn + EPS)
                b = 0.3 + 0.4 * (fn + EPS / 2) / (fp + fn + EPS)
                losses.append(1 - (tp + EPS) / (tp + a * fp + b * fn + EPS))
        loss = build_loss({"name": "adaptive_tversky", "regions_per_axis": [2, 3]})
        torch.testing.assert_close(loss(logits, target), torch.stack(losses).mean())

    def test_regions_must_divide_shape(self) -> None:
        logits, target = random_case(1, shape=(1, 5, 5))
        with pytest.raises(ValueError, match=r"regions_per_axis \(2,\) does not divide"):
            build_loss({"name": "adaptive_tversky", "regions_per_axis": 2})(logits, target)


class TestDistanceLosses:
    def test_signed_distance_map_matches_monai(self) -> None:
        from monai.losses import BoundaryLoss as MonaiBoundary

        _, target = random_case(3, shape=(2, 7, 6))
        torch.testing.assert_close(
            signed_distance_map(target), MonaiBoundary().compute_distance_map(target.float())
        )

    def test_signed_distance_map_values(self) -> None:
        mask = np.zeros((1, 1, 1, 7), dtype=np.float32)
        mask[..., 2:5] = 1  # inside: -(d-1) = 0, -1, 0; outside: distances 2, 1 | 1, 2
        expected = np.array([2, 1, 0, -1, 0, 1, 2], dtype=np.float32)
        np.testing.assert_array_equal(signed_distance_map(mask)[0, 0, 0].numpy(), expected)

    @pytest.mark.parametrize("channels", CHANNELS)
    def test_boundary_matches_naive_and_monai(self, channels: int) -> None:
        from monai.losses import BoundaryLoss as MonaiBoundary

        logits, target = random_case(channels, shape=(2, 7, 6))
        p = naive_probs(logits)
        phi = signed_distance_map(target).double()
        expected = torch.stack([(p[:, c] * phi[:, c]).mean() for c in range(channels)]).mean()
        loss = build_loss({"name": "boundary"})
        torch.testing.assert_close(loss(logits, target), expected)
        torch.testing.assert_close(loss(logits, target, distance_map=phi), expected)
        monai = MonaiBoundary(sigmoid=channels == 1, softmax=channels > 1, batch=True)
        torch.testing.assert_close(loss(logits, target), monai(logits, target))

    @pytest.mark.parametrize("channels", CHANNELS)
    def test_hausdorff_dt_matches_naive(self, channels: int) -> None:
        logits, target = random_case(channels, shape=(2, 7, 6))
        p = naive_probs(logits)

        def dist(
            mask: np.ndarray,
        ) -> np.ndarray:  # unsigned distance to the boundary, 0 if empty/full
            if not mask.any() or mask.all():
                return np.zeros(mask.shape)
            return distance_transform_edt(mask) + distance_transform_edt(~mask)

        per_channel = []
        for c in range(channels):
            terms = []
            for b in range(2):
                pb, gb = p[b, c].numpy(), target[b, c].numpy()
                d = dist(pb > 0.5) ** 2 + dist(gb > 0.5) ** 2  # Karimi eq. 8 with alpha = 2
                terms.append((pb - gb) ** 2 * d)
            per_channel.append(np.mean(terms))
        loss = build_loss({"name": "hausdorff_dt"})(logits, target)
        torch.testing.assert_close(loss.item(), float(np.mean(per_channel)), rtol=1e-5, atol=1e-7)

    def test_distance_losses_need_2d_or_3d(self) -> None:
        logits, target = random_case(1, shape=(2, 8))
        with pytest.raises(ValueError, match=r"boundary loss needs 2D"):
            build_loss({"name": "boundary"})(logits, target)


class TestCompound:
    @pytest.mark.parametrize("channels", CHANNELS)
    def test_dice_ce(self, channels: int) -> None:
        logits, target = random_case(channels)
        dice = build_loss({"name": "dice"})(logits, target)
        ce = build_loss({"name": "bce"})(logits, target)
        got = build_loss({"name": "dice_ce", "lambda_dice": 0.7, "lambda_ce": 1.3})(logits, target)
        torch.testing.assert_close(got, 0.7 * dice + 1.3 * ce)

    def test_dice_ce_matches_monai(self) -> None:
        from monai.losses import DiceCELoss as MonaiDiceCE

        logits, target = random_case(3)
        ours = build_loss({"name": "dice_ce"})(logits, target)
        torch.testing.assert_close(ours, MonaiDiceCE(softmax=True, batch=True)(logits, target))

    def test_dice_focal(self) -> None:
        logits, target = random_case(3)
        dice = build_loss({"name": "dice"})(logits, target)
        focal = build_loss({"name": "focal", "gamma": 1.5})(logits, target)
        got = build_loss({"name": "dice_focal", "gamma": 1.5, "lambda_focal": 2.0})(logits, target)
        torch.testing.assert_close(got, dice + 2.0 * focal)

    def test_manifest_static_is_weighted_sum(self) -> None:
        logits, target = random_case(1)
        spec = {
            "name": "manifest",
            "terms": [
                {"name": "tversky", "weight": 2.0, "params": {"alpha": 0.3, "beta": 0.7}},
                {"name": "focal", "weight": 0.5, "params": {"gamma": 2.0}, "reason": "ignored"},
            ],
        }
        loss = build_loss(spec)
        tv = build_loss({"name": "tversky", "alpha": 0.3, "beta": 0.7})(logits, target)
        fo = build_loss({"name": "focal", "gamma": 2.0})(logits, target)
        torch.testing.assert_close(loss(logits, target), 2.0 * tv + 0.5 * fo)
        assert loss.term_names == ("tversky", "focal")
        assert loss.weights == (2.0, 0.5)
        np.testing.assert_allclose(loss.last_values, [tv.item(), fo.item()], rtol=1e-12)

    def test_manifest_softadapt_updates_once_per_training_step(self) -> None:
        logits, target = random_case(1)
        loss = build_loss(
            {
                "name": "manifest",
                "terms": [{"name": "dice"}, {"name": "bce"}],
                "weighting": {"method": "softadapt", "params": {"beta": 5.0}},
            }
        )
        first = loss(logits, target)
        v1 = loss.last_values
        torch.testing.assert_close(first.item(), 0.5 * v1[0] + 0.5 * v1[1])  # s = 0 at step 1
        logits2 = logits * 0.5
        second = loss(logits2, target)
        v2 = loss.last_values
        s = [v2[0] - v1[0], v2[1] - v1[1]]  # two values: the slope is the difference
        ns = [x / (abs(s[0]) + abs(s[1])) for x in s]  # SoftAdapt's default normalized slopes
        e = [math.exp(5.0 * x) for x in ns]
        w = [x / sum(e) for x in e]  # thesis eq. 5.4
        torch.testing.assert_close(second.item(), w[0] * v2[0] + w[1] * v2[1])
        loss.eval()
        loss(logits, target)  # validation: weights stay
        assert loss.weighting.step == 2
        np.testing.assert_allclose(loss.weights, w, rtol=1e-12)

    def test_manifest_passes_distance_map_and_gradients_flow(self) -> None:
        logits, target = random_case(1, shape=(2, 7, 6))
        logits.requires_grad_(True)
        loss = build_loss(
            {
                "name": "manifest",
                "terms": [{"name": "dice"}, {"name": "boundary"}],
                "weighting": {"method": "rebalance", "params": {"steps": 10}},
            }
        )
        value = loss(logits, target, distance_map=signed_distance_map(target))
        value.backward()
        assert torch.isfinite(logits.grad).all()
        assert logits.grad.abs().sum() > 0

    def test_manifest_unknown_term_names_position(self) -> None:
        with pytest.raises(
            ValueError, match=r"terms\[1\]: unknown loss 'tverksy'\. Did you mean 'tversky'\?"
        ):
            build_loss({"name": "manifest", "terms": [{"name": "dice"}, {"name": "tverksy"}]})

    def test_manifest_bad_weighting(self) -> None:
        with pytest.raises(ValueError, match=r"unknown weighting method 'softadapter'"):
            build_loss(
                {
                    "name": "manifest",
                    "terms": [{"name": "dice"}],
                    "weighting": {"method": "softadapter"},
                }
            )

    def test_manifest_learnable_barron_parameters_visible(self) -> None:
        loss = build_loss(
            {"name": "manifest", "terms": [{"name": "barron", "params": {"learnable": True}}]}
        )
        assert len(list(loss.parameters())) == 1


class TestBarronRho:
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)

    @pytest.mark.parametrize(
        ("alpha", "closed_form"),
        [
            (2.0, lambda z: 0.5 * z**2),  # L2
            (0.0, lambda z: torch.log(0.5 * z**2 + 1)),  # Cauchy
            (-math.inf, lambda z: 1 - torch.exp(-0.5 * z**2)),  # Welsch
            (math.inf, lambda z: torch.exp(0.5 * z**2) - 1),
            (1.0, lambda z: torch.sqrt(z**2 + 1) - 1),  # pseudo-Huber
            (-2.0, lambda z: 2 * z**2 / (z**2 + 4)),  # Geman-McClure
        ],
    )
    def test_closed_forms(self, alpha: float, closed_form) -> None:  # Barron 2019, eq. 3-8
        scale = 0.7
        torch.testing.assert_close(barron_rho(self.x, alpha, scale), closed_form(self.x / scale))

    @pytest.mark.parametrize(
        ("near", "limit"), [(2.0, lambda z: 0.5 * z**2), (0.0, lambda z: torch.log1p(0.5 * z**2))]
    )
    @pytest.mark.parametrize("delta", [1e-6, -1e-6])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_continuous_near_special_values(self, near, limit, delta: float, dtype) -> None:
        x = self.x.detach().clone().to(dtype).requires_grad_(True)
        rho = barron_rho(x, near + delta, 1.0)
        torch.testing.assert_close(rho.detach(), limit(x.detach()), atol=1e-5, rtol=1e-5)
        rho.sum().backward()
        assert torch.isfinite(x.grad).all()

    @pytest.mark.parametrize("alpha", [0.0, 2.0, 2.0 + 1e-7, 1e-7, -1e-7, -math.inf])
    def test_gradients_finite_in_x_and_alpha(self, alpha: float) -> None:
        x = self.x.detach().clone().requires_grad_(True)
        a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
        barron_rho(x, a, 0.5).sum().backward()
        assert torch.isfinite(x.grad).all()
        assert torch.isfinite(a.grad).all()

    def test_nonpositive_scale_rejected(self) -> None:
        with pytest.raises(ValueError, match=r"scale must be > 0"):
            barron_rho(self.x, 1.0, 0.0)

    def test_log_partition_closed_forms(self) -> None:
        table = log_partition_table(0.0, 2.0, 3)
        # Z(0) = pi sqrt(2) (Cauchy), Z(1) = 2 e K1(1) (scipy.special.k1), Z(2) = sqrt(2 pi)
        from scipy.special import k1

        np.testing.assert_allclose(
            table,
            [
                math.log(math.pi * math.sqrt(2)),
                math.log(2 * math.e * k1(1.0)),
                0.5 * math.log(2 * math.pi),
            ],
            rtol=1e-9,
        )


class TestBarronLoss:
    @pytest.mark.parametrize("channels", CHANNELS)
    def test_fixed_alpha_matches_naive(self, channels: int) -> None:
        logits, target = random_case(channels)
        z = (naive_probs(logits) - target) / 0.2
        expected = (torch.sqrt(z**2 + 1) - 1).sum(dim=1).mean()  # alpha = 1
        torch.testing.assert_close(
            build_loss({"name": "barron", "alpha": 1.0, "scale": 0.2})(logits, target), expected
        )

    def test_learnable_is_nll_with_log_partition(self) -> None:
        logits, target = random_case(1)
        loss = build_loss(
            {"name": "barron", "alpha": 1.0, "scale": 0.2, "learnable": True, "table_size": 129}
        )
        fixed = build_loss({"name": "barron", "alpha": 1.0, "scale": 0.2})(logits, target)
        log_z1 = math.log(
            2 * math.e * 0.6019072301972346
        )  # Z(1) = 2 e K1(1), K1(1) from scipy.special.k1
        torch.testing.assert_close(
            loss(logits, target).item(), fixed.item() + log_z1, rtol=1e-6, atol=1e-6
        )

    def test_learnable_alpha_does_not_collapse(self) -> None:
        # residuals drawn from the alpha = 2 (Gaussian) model: the NLL's minimiser is
        # near alpha = 2, while minimising rho alone would drive alpha to its lower bound.
        g = torch.Generator().manual_seed(7)
        x = 0.1 * torch.randn(4000, generator=g)
        loss = build_loss(
            {
                "name": "barron",
                "alpha": 1.0,
                "scale": 0.1,
                "learnable": True,
                "alpha_range": [0.0, 3.0],
                "table_size": 129,
            }
        )
        opt = torch.optim.Adam(loss.parameters(), lr=0.1)
        lo, hi = loss.alpha_range
        for _ in range(150):
            opt.zero_grad()
            alpha = loss.current_alpha()
            from pipeline.train.losses.robust import interpolate_log_partition

            nll = (
                barron_rho(x, alpha, 0.1)
                + interpolate_log_partition(alpha, lo, hi, loss.log_z_table)
            ).mean()
            nll.backward()
            opt.step()
        assert 1.6 < loss.current_alpha().item() < 2.6

    def test_learnable_alpha_must_start_inside_range(self) -> None:
        with pytest.raises(ValueError, match=r"learnable alpha must start strictly inside"):
            build_loss({"name": "barron", "alpha": 2.0, "learnable": True})


class TestGradientsAndShapes:
    @pytest.mark.parametrize("name", sorted(set(LOSSES) - {"manifest"}))
    @pytest.mark.parametrize("channels", CHANNELS)
    def test_backward_gives_finite_gradients(self, name: str, channels: int) -> None:
        logits, target = random_case(channels, shape=(2, 6, 5))
        logits.requires_grad_(True)
        value = build_loss({"name": name})(logits, target)
        assert value.ndim == 0
        value.backward()
        assert torch.isfinite(logits.grad).all()
        assert logits.grad.abs().sum() > 0

    def test_3d_input(self) -> None:
        logits, target = random_case(2, shape=(1, 4, 4, 4))
        assert torch.isfinite(build_loss({"name": "dice_ce"})(logits, target))

    def test_shape_mismatch(self) -> None:
        logits, target = random_case(3)
        with pytest.raises(
            ValueError, match=r"target shape \(2, 2, 6, 5\) differs from logits shape"
        ):
            build_loss({"name": "dice"})(logits, target[:, :2])

    def test_reduction_none_shapes(self) -> None:
        logits, target = random_case(3)
        assert build_loss({"name": "tversky", "reduction": "none"})(logits, target).shape == (3,)
        assert build_loss({"name": "focal", "reduction": "none"})(logits, target).shape == (2, 6, 5)


class TestRegistry:
    def test_required_names_registered(self) -> None:
        required = {
            "bce",
            "wce",
            "focal",
            "dice",
            "iou",
            "tversky",
            "focal_tversky",
            "asymmetric",
            "generalized_dice",
            "dice_ce",
            "dice_focal",
            "boundary",
            "hausdorff_dt",
            "barron",
            "adaptive_tversky",
            "manifest",
        }
        assert required <= set(LOSSES)

    def test_unknown_name_suggests(self) -> None:
        with pytest.raises(ValueError, match=r"unknown loss 'tversy'\. Did you mean 'tversky'\?"):
            build_loss({"name": "tversy"})

    def test_duplicate_registration_raises(self) -> None:
        with pytest.raises(ValueError, match=r"loss name 'dice' is already used by DiceLoss"):
            register_loss("dice")(torch.nn.Module)

    def test_bad_parameter_is_value_error(self) -> None:
        with pytest.raises(ValueError, match=r"loss 'dice': bad parameters \{'alpha': 0.3\}"):
            build_loss({"name": "dice", "alpha": 0.3})

    def test_bad_reduction(self) -> None:
        with pytest.raises(
            ValueError, match=r"reduction must be one of \['mean', 'sum', 'none'\], got 'avg'"
        ):
            build_loss({"name": "focal", "reduction": "avg"})

    def test_missing_name(self) -> None:
        with pytest.raises(ValueError, match=r"has no 'name'"):
            build_loss({"alpha": 0.3})


def test_learnable_barron_backward_reaches_alpha() -> None:
    logits, target = random_case(3)
    loss = build_loss({"name": "barron", "learnable": True, "table_size": 65})
    loss(logits.float(), target.float()).backward()
    assert torch.isfinite(loss.alpha_logit.grad)
    assert loss.alpha_logit.grad != 0
