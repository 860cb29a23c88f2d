"""Greedy parameter adaptation (Seo et al. 2021; thesis 5.1): the manifest loss's
``adaptation`` spec, the search on a tiny model, and the training loop that runs it."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from pipeline.train.greedy import action_grid, greedy_search, prediction_error
from pipeline.train.losses import ManifestLoss, build_loss

TERMS = [{"name": "tversky", "params": {"alpha": 0.3, "beta": 0.7}}, {"name": "bce"}]
GREEDY = {"method": "greedy", "term": 0, "params": ["alpha", "beta"]}


def tiny_problem(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 1-layer conv on a 1x1x8x8 input and a binary target (a 3x4 block)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Conv2d(1, 1, 3, padding=1)
    with torch.no_grad():
        model.weight.copy_(0.3 * torch.randn(model.weight.shape, generator=g))
        model.bias.zero_()
    x = torch.randn(1, 1, 8, 8, generator=g)
    y = torch.zeros(1, 1, 8, 8)
    y[..., 2:5, 3:7] = 1.0
    return model, x, y


def manifest(**kw) -> ManifestLoss:
    return ManifestLoss(terms=kw.pop("terms", TERMS), weighting=kw.pop("weighting", None),
                        adaptation=kw.pop("adaptation", GREEDY))


def plain_step(model: nn.Module, loss_fn: ManifestLoss, opt: torch.optim.Optimizer,
               x: torch.Tensor, y: torch.Tensor) -> None:
    """The loop's training step without mixed precision."""
    loss = loss_fn(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def setup(seed: int = 0, **kw):
    model, x, y = tiny_problem(seed)
    loss_fn = manifest(**kw)
    opt = torch.optim.AdamW(model.parameters(), lr=0.2, weight_decay=1e-4)
    plain_step(model, loss_fn, opt, x, y)  # the optimizer has moments to restore
    return model, loss_fn, opt, x, y


class TestSearch:
    def test_leaves_nothing_behind_but_the_chosen_parameters(self) -> None:
        model, loss_fn, opt, x, y = setup(weighting={"method": "softadapt"})
        twin_model, twin_loss = copy.deepcopy(model), copy.deepcopy(loss_fn)
        twin_opt = torch.optim.AdamW(twin_model.parameters(), lr=0.2, weight_decay=1e-4)
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))

        choice = greedy_search(model, loss_fn, opt, x, y)
        assert loss_fn.adapted_values() == choice.values
        assert all(p.grad is None for p in model.parameters())
        plain_step(model, loss_fn, opt, x, y)

        twin_loss.set_adapted_values(choice.values)  # a plain step with the chosen values
        plain_step(twin_model, twin_loss, twin_opt, x, y)

        for (k, a), (_, b) in zip(model.state_dict().items(), twin_model.state_dict().items(),
                                  strict=True):
            assert torch.equal(a, b), k
        sa, sb = opt.state_dict()["state"], twin_opt.state_dict()["state"]
        for i in sa:
            for k in sa[i]:
                assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)
        assert loss_fn.weighting.history == twin_loss.weighting.history
        assert loss_fn.weighting.weights == twin_loss.weighting.weights
        assert loss_fn.last_values == twin_loss.last_values

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_chooses_the_argmin_of_the_l2_norm(self, seed: int) -> None:
        model, loss_fn, opt, x, y = setup(seed)
        start = loss_fn.adapted_values()
        # oracle: each action on independent copies, the L2 norm written out
        expected = []
        for fa, fb in itertools.product([0.9, 1.0, 1.1], repeat=2):
            m, lf = copy.deepcopy(model), copy.deepcopy(loss_fn)
            o = torch.optim.AdamW(m.parameters(), lr=0.2, weight_decay=1e-4)
            o.load_state_dict(copy.deepcopy(opt.state_dict()))
            term = lf.terms[0]
            term.alpha = min(max(start["alpha"] * fa, 0.05), 0.95)
            term.beta = min(max(start["beta"] * fb, 0.05), 0.95)
            plain_step(m, lf, o, x, y)
            with torch.no_grad():
                p = torch.sigmoid(m(x))
            expected.append(math.sqrt(float(((p - y) ** 2).sum())))
        choice = greedy_search(model, loss_fn, opt, x, y)
        assert choice.candidates == tuple(itertools.product([0.9, 1.0, 1.1], repeat=2))
        torch.testing.assert_close(torch.tensor(choice.errors), torch.tensor(expected),
                                   rtol=1e-6, atol=0)
        best = min(range(9), key=expected.__getitem__)
        assert choice.action == choice.candidates[best]
        assert choice.values == pytest.approx(
            {"alpha": start["alpha"] * choice.action[0], "beta": start["beta"] * choice.action[1]})
        assert max(expected) - min(expected) > 1e-4  # the choice is not a tie

    def test_ties_keep_the_parameters(self) -> None:
        # term 1 has weight 0: its alpha, beta cannot change the step, every error ties
        terms = [{"name": "bce"}, {"name": "tversky", "weight": 0.0}]
        model, loss_fn, opt, x, y = setup(terms=terms, adaptation={**GREEDY, "term": 1})
        choice = greedy_search(model, loss_fn, opt, x, y)
        assert len(set(choice.errors)) == 1
        assert choice.action == (1.0, 1.0)
        assert choice.values == choice.before

    def test_bounds_clamp_and_duplicates_are_not_retried(self) -> None:
        terms = [{"name": "tversky", "params": {"alpha": 0.05, "beta": 0.95}}]
        model, loss_fn, opt, x, y = setup(terms=terms)
        choice = greedy_search(model, loss_fn, opt, x, y)
        # alpha * 0.9 clamps to 0.05 (= alpha * 1.0); beta * 1.1 clamps to 0.95
        by_action = dict(zip(choice.candidates, choice.errors, strict=True))
        assert by_action[(0.9, 1.0)] == by_action[(1.0, 1.0)]
        assert by_action[(1.0, 1.1)] == by_action[(1.0, 1.0)]
        assert 0.05 <= choice.values["alpha"] <= 0.95
        assert 0.05 <= choice.values["beta"] <= 0.95

    def test_every_action_of_three_parameters(self) -> None:
        assert len(action_grid([0.9, 1.0, 1.1], 3)) == 27  # A^p, thesis 5.1

    def test_needs_an_adaptation(self) -> None:
        model, x, y = tiny_problem()
        loss_fn = ManifestLoss(terms=TERMS)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ValueError, match=r"needs a manifest loss with an adaptation"):
            greedy_search(model, loss_fn, opt, x, y)

    def test_prediction_error_softmax_and_divergence(self) -> None:
        logits = torch.tensor([[[[2.0]], [[0.0]]]])  # (1, 2, 1, 1): softmax over 2 channels
        target = torch.tensor([[[[1.0]], [[0.0]]]])
        p = math.exp(2) / (math.exp(2) + 1)  # softmax of (2, 0), first channel
        assert prediction_error(logits, target) == pytest.approx(math.sqrt(2) * (1 - p))
        assert prediction_error(torch.full((1, 1, 2, 2), math.nan), target[:, :1]) == math.inf


class TestManifestLossAdaptation:
    def test_spec_defaults(self) -> None:
        spec = manifest().adaptation
        assert spec is not None
        assert (spec.term, spec.params, spec.factors, spec.every) == (
            0, ("alpha", "beta"), (0.9, 1.0, 1.1), 1)
        assert spec.bounds == ((0.05, 0.95), (0.05, 0.95))

    def test_set_values_clamps_and_changes_the_loss(self) -> None:
        loss_fn = manifest(terms=TERMS[:1])
        _, _, y = tiny_problem()
        logits = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(4))
        before = float(loss_fn(logits, y))
        assert loss_fn.set_adapted_values({"alpha": 2.0, "beta": 0.01}) == {
            "alpha": 0.95, "beta": 0.05}
        assert loss_fn.adapted_values() == {"alpha": 0.95, "beta": 0.05}
        assert float(loss_fn(logits, y)) != before  # the MONAI Tversky sees the new values

    def test_unbounded_parameter_only_stays_positive(self) -> None:
        loss_fn = manifest(terms=[{"name": "focal"}], adaptation={**GREEDY, "params": ["gamma"]})
        assert loss_fn.adaptation is not None
        assert loss_fn.adaptation.bounds == ((0.0, math.inf),)
        assert loss_fn.set_adapted_values({"gamma": 7.5}) == {"gamma": 7.5}

    def test_built_through_the_registry(self) -> None:
        loss_fn = build_loss({"name": "manifest", "terms": TERMS,
                              "adaptation": {**GREEDY, "factors": [0.8, 1.25], "every": 3,
                                             "reason": "ignored here"}})
        assert isinstance(loss_fn, ManifestLoss)
        assert loss_fn.adaptation is not None
        assert loss_fn.adaptation.factors == (0.8, 1.25)
        assert loss_fn.adaptation.every == 3

    @pytest.mark.parametrize(("change", "message"), [
        ({"term": 2}, r"adaptation\.term must be the index of a term, 0 to 1, got 2"),
        ({"term": True}, r"adaptation\.term must be the index of a term, 0 to 1, got True"),
        ({"params": ["gamma"]},
         r"adaptation\.params: 'gamma' is not a float parameter of terms\[0\] \('tversky'\)"),
        ({"params": ["include_background"]},
         r"'include_background' is not a float parameter of terms\[0\] .*bool: True"),
        ({"params": ["reduction"]}, r"'reduction' is not a float parameter .*str: 'mean'"),
        ({"params": []}, r"adaptation\.params must be a non-empty list of names, got \[\]"),
        ({"params": "alpha"}, r"adaptation\.params must be a non-empty list of names, got 'alpha'"),
        ({"params": ["alpha", "alpha"]}, r"names a parameter twice: \['alpha', 'alpha'\]"),
        ({"factors": [0.9, 0.0]}, r"adaptation\.factors must be finite numbers > 0, got \[0\.9, 0\.0\]"),
        ({"factors": []}, r"adaptation\.factors must be finite numbers > 0, got \[\]"),
        ({"every": 0}, r"adaptation\.every must be an int >= 1, got 0"),
        ({"method": "heuristic"}, r"adaptation\.method must be 'greedy', got 'heuristic'"),
        ({"colour": "red"}, r"adaptation: unknown keys \['colour'\]"),
    ])
    def test_rejects(self, change: dict, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            manifest(adaptation={**GREEDY, **change})

    def test_rejects_a_zero_parameter(self) -> None:
        with pytest.raises(ValueError, match=r"terms\[0\]\.gamma is 0\.0; a multiplicative action"):
            manifest(terms=[{"name": "focal", "params": {"gamma": 0.0}}],
                     adaptation={**GREEDY, "params": ["gamma"]})

    def test_rejects_a_learnable_tensor(self) -> None:
        terms = [{"name": "barron", "params": {"learnable": True}}]
        with pytest.raises(ValueError, match=r"'alpha_logit' is not a float parameter .*Parameter"):
            manifest(terms=terms, adaptation={**GREEDY, "params": ["alpha_logit"]})

    def test_set_values_without_adaptation_or_unknown_name(self) -> None:
        with pytest.raises(ValueError, match=r"has no adaptation; nothing to set"):
            ManifestLoss(terms=TERMS).set_adapted_values({"alpha": 0.5})
        with pytest.raises(ValueError, match=r"\['smooth'\] are not adapted parameters"):
            manifest().set_adapted_values({"smooth": 0.5})


class TestTrainingLoop:
    def test_trajectory_is_recorded_and_resumed(self, tmp_path) -> None:
        from pipeline.train.loop import CHECKPOINT, Fold, load_checkpoint, train_fold
        from tests.train.test_data import make_store, plan_for
        from tests.train.test_loop import SPACING, tiny_cfg

        url, ds = make_store(tmp_path, 2)
        fold = Fold(0, ("case00",), ("case01",))
        spec = {"name": "manifest", "terms": TERMS, "weighting": {"method": "cov"},
                "adaptation": {**GREEDY, "every": 1}}
        run = tmp_path / "run"
        first = train_fold(url, ds, fold, "manifest", spec, plan_for(), tiny_cfg(epochs=2),
                           run, spacing_zyx=SPACING)
        for h in first.history:
            assert set(h["adapted"]) == {"alpha", "beta"}
            assert 0.05 <= h["adapted"]["alpha"] <= 0.95
            # no adaptive Tversky term: alpha, beta are the greedy term's, for the plots
            assert h["alpha"] == pytest.approx(h["adapted"]["alpha"])
            assert h["beta"] == pytest.approx(h["adapted"]["beta"])
        state = load_checkpoint(run / CHECKPOINT)
        assert set(state["adaptation"]) == {"alpha", "beta"}

    def test_resume_continues_from_the_adapted_values(self, tmp_path) -> None:
        from pipeline.train.loop import Fold, train_fold
        from tests.train.test_data import make_store, plan_for
        from tests.train.test_loop import SPACING, tiny_cfg

        url, ds = make_store(tmp_path, 2)
        fold = Fold(0, ("case00",), ("case01",))
        spec = {"name": "manifest", "terms": TERMS, "adaptation": GREEDY}
        whole = train_fold(url, ds, fold, "manifest", spec, plan_for(), tiny_cfg(epochs=3),
                           tmp_path / "whole", spacing_zyx=SPACING)

        class Stop(Exception):
            pass

        def stop_after_epoch_2(event) -> None:  # the checkpoint of epoch 2 is written
            if event["kind"] == "epoch" and event["epoch"] == 2:
                raise Stop

        with pytest.raises(Stop, match=r"^$"):
            train_fold(url, ds, fold, "manifest", spec, plan_for(), tiny_cfg(epochs=3),
                       tmp_path / "cut", spacing_zyx=SPACING, progress=stop_after_epoch_2)
        resumed = train_fold(url, ds, fold, "manifest", spec, plan_for(), tiny_cfg(epochs=3),
                             tmp_path / "cut", spacing_zyx=SPACING)
        # epoch 3 starts from the checkpoint's alpha, beta (not the manifest's 0.3, 0.7)
        assert resumed.history[2]["adapted"] == whole.history[2]["adapted"]
        assert resumed.history == whole.history
