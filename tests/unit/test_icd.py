"""The implicit coordinate-descent learner against brute force: its loss is the all-pairs loss, each of
its steps is the exact minimiser for the parameters it moves, and it recovers planted preferences."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import topx.icd as icd_module
from topx.config import HyperParameters
from topx.errors import InputDataError
from topx.feature_index import FeatureIndex
from topx.fm import predict
from topx.icd import _ICD, ImplicitData, feature_groups, train_icd
from topx.vectors import export_vectors


def small_problem(seed: int = 0, *, side_features: bool = True,
                  history: bool = False) -> tuple[FeatureIndex, ImplicitData]:
    """8 users x 7 items; users with a categorical and a numeric feature, items with a multi-valued one;
    with ``history``, each side's history features too (many features to a row, in many groups)."""
    rng = np.random.default_rng(seed)
    n_users, n_items = 8, 7
    users = [f"u{j}" for j in range(n_users)]
    items = [f"i{j}" for j in range(n_items)]
    if side_features:
        group = np.eye(2, dtype=np.float32)[rng.integers(0, 2, n_users)]
        age = rng.normal(size=(n_users, 1)).astype(np.float32)
        tags = (rng.random((n_items, 3)) < 0.5).astype(np.float32)
        fi = FeatureIndex.build(users, items, sp.csr_matrix(np.hstack([group, age])), ("g=a", "g=b", "age"),
                                sp.csr_matrix(tags), ("t=x", "t=y", "t=z"))
    else:
        fi = FeatureIndex.one_hot(users, items)
    mask = rng.random((n_users, n_items)) < 0.35
    mask[np.arange(n_users), rng.integers(0, n_items, n_users)] = True
    u, i = np.nonzero(mask)
    weight = rng.uniform(0.5, 2.0, len(u)).astype(np.float32)
    if history:
        fi = fi.with_history(u, i)
    return fi, ImplicitData(fi.user_x, fi.item_x, u.astype(np.int64), i.astype(np.int64), weight)


def hyper(**overrides: object) -> HyperParameters:
    base = dict(learner="icd", predictor_type="binary_classifier", num_factors=3, epochs=4, unobserved_weight=1.5,
                factors_wd=0.05, linear_wd=0.02, factors_init_sigma=0.3, linear_init_sigma=0.1,
                regularization_exponent=0.0)
    return replace(HyperParameters(), **{**base, **overrides})


def brute_loss(model: _ICD, fi: FeatureIndex, data: ImplicitData, v: torch.Tensor, w: torch.Tensor,
               b: torch.Tensor) -> torch.Tensor:
    """The objective over every (user, item) pair, from the FM's own formula, with the penalty."""
    x = torch.as_tensor(sp.vstack([fi.user_x[u] + fi.item_x[i] for u in range(fi.n_users)
                                   for i in range(fi.n_items)]).toarray(), dtype=torch.float64)
    vx = x @ v
    y = b + x @ w + 0.5 * (vx.pow(2).sum(1) - (x.pow(2) @ v.pow(2)).sum(1))
    y = y.reshape(fi.n_users, fi.n_items)
    conf = torch.zeros(fi.n_users, fi.n_items, dtype=torch.float64)
    conf[data.user_rows, data.item_rows] = torch.as_tensor(data.weight, dtype=torch.float64)
    observed = conf > 0
    a0 = model.alpha0
    loss = torch.where(observed, conf * (y - 1) ** 2, a0 * y**2).sum()
    penalty = 0.0
    for side in (model.users, model.items):
        for group in side.groups:
            scale = group.reg_scale.double()
            penalty = penalty + (scale * (model.hp.factors_wd * v[group.features].pow(2).sum(1)
                                          + model.hp.linear_wd * w[group.features].pow(2))).sum()
    return loss + penalty


@pytest.mark.parametrize(("side_features", "history", "cg_steps"),
                         [(False, False, 0), (True, False, 0), (True, True, 0), (False, False, 12), (True, False, 12)])
def test_each_group_step_is_the_exact_minimiser(side_features: bool, history: bool, cg_steps: int) -> None:
    """Exactly with the Cholesky solve; with conjugate gradients (on the id groups) once they take enough
    steps: k + 1 = 4 in exact arithmetic, a few more in float32."""
    fi, data = small_problem(side_features=side_features, history=history)
    hp = hyper(cg_steps=cg_steps)
    model = _ICD(data, fi.n_features, hp, torch.device("cpu"))
    with torch.no_grad():
        for this, other in ((model.users, model.items), (model.items, model.users)):
            o = model._other_vectors(other)
            gram = (o[:-1].double().T @ o[:-1].double()).float()
            for group in this.groups:
                model._update_group(this, group, o, gram)
                # After the step, the brute-force gradient for the group's parameters vanishes.
                v = model.v.double().clone().requires_grad_(True)
                w = model.w.double().clone().requires_grad_(True)
                with torch.enable_grad():
                    loss = brute_loss(model, fi, data, v, w, model.bias.double())
                    gv, gw = torch.autograd.grad(loss, (v, w))
                scale = float(loss)
                assert gv[group.features].abs().max() < 1e-4 * scale, (group.features, gv[group.features])
                assert gw[group.features].abs().max() < 1e-4 * scale
                o = model._other_vectors(other)
                gram = (o[:-1].double().T @ o[:-1].double()).float()
            # The caches still equal a fresh computation from the parameters.
            p, lin, sq = this.p.clone(), this.lin.clone(), this.sq.clone()
            model._refresh(this)
            assert torch.allclose(p, this.p, atol=1e-5) and torch.allclose(lin, this.lin, atol=1e-5)
            assert torch.allclose(sq, this.sq, atol=1e-5)


@pytest.mark.parametrize("cg_steps", [0, 1])
def test_the_loss_it_reports_is_the_all_pairs_loss_and_it_never_rises(cg_steps: int) -> None:
    """Also with a single conjugate-gradient step per update: an inexact step still lowers the loss."""
    fi, data = small_problem()
    hp = hyper(epochs=6, cg_steps=cg_steps)
    model = _ICD(data, fi.n_features, hp, torch.device("cpu"))
    previous = np.inf
    with torch.no_grad():
        for _ in range(hp.epochs):
            model.epoch()
            reported = model.loss() * len(data.user_rows)
            zero_penalty = replace(hp, factors_wd=0.0, linear_wd=0.0)
            model.hp = zero_penalty
            exact = float(brute_loss(model, fi, data, model.v.double(), model.w.double(), model.bias.double()))
            model.hp = hp
            assert reported == pytest.approx(exact, rel=1e-4)
            with_penalty = float(brute_loss(model, fi, data, model.v.double(), model.w.double(), model.bias.double()))
            assert with_penalty <= previous * (1 + 1e-6)
            previous = with_penalty


@pytest.mark.parametrize("history", [False, True])
def test_trained_params_score_through_the_recipe_vectors_as_the_fm_does(history: bool) -> None:
    fi, data = small_problem(history=history)
    result = train_icd(data, fi.n_features, hyper(), device="cpu", progress=False)
    vectors = export_vectors(result.params, fi)
    users = np.repeat(np.arange(fi.n_users), fi.n_items)
    items = np.tile(np.arange(fi.n_items), fi.n_users)
    fm = predict(result.params, fi.user_x[users] + fi.item_x[items])
    recipe = (vectors.user_vectors[users] * vectors.item_vectors[items]).sum(1) + vectors.user_constants[users]
    np.testing.assert_allclose(recipe, fm, rtol=1e-4, atol=1e-4)
    assert result.params.predictor_type == "binary_classifier" and len(result.history) == 4


def test_it_recovers_planted_tastes() -> None:
    """Users of two tastes each take most items of their own half of the catalogue: ranked by the
    model, every user's unseen items of their own half come before any of the other half."""
    rng = np.random.default_rng(1)
    n_users, n_items = 60, 20
    taste = np.arange(n_users) % 2
    half = np.arange(n_items) % 2
    take = (taste[:, None] == half[None, :]) & (rng.random((n_users, n_items)) < 0.6)
    u, i = np.nonzero(take)
    fi = FeatureIndex.one_hot([f"u{j}" for j in range(n_users)], [f"i{j}" for j in range(n_items)])
    hp = hyper(num_factors=4, epochs=8, unobserved_weight=0.3, factors_wd=1.0, linear_wd=1.0,
               factors_init_sigma=0.1, linear_init_sigma=0.0)
    result = train_icd(ImplicitData(fi.user_x, fi.item_x, u, i), fi.n_features, hp, device="cpu", progress=False)
    vectors = export_vectors(result.params, fi)
    scores = vectors.user_vectors @ vectors.item_vectors.T
    for user in range(n_users):
        unseen = ~take[user]
        own = scores[user, unseen & (half == taste[user])]
        theirs = scores[user, unseen & (half != taste[user])]
        if len(own) and len(theirs):
            assert own.min() > theirs.max(), user


def test_conjugate_gradients_with_big_entities_split_over_blocks_solve_as_the_exact_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Entities with more pairs than a block holds are split over blocks, which per-block conjugate
    gradients cannot solve: they form a group of their own that takes the exact path. Whatever the
    budget, and CG run to convergence or the exact solve, training gives the same model."""
    fi, data = small_problem(side_features=False)
    hp = hyper(epochs=3)
    reference = train_icd(data, fi.n_features, hp, device="cpu", progress=False).params
    monkeypatch.setattr(icd_module, "_BLOCK_BYTES", 3 * (hp.num_factors + 2) * 4)   # 3 pairs a block
    model = _ICD(data, fi.n_features, replace(hp, cg_steps=12), torch.device("cpu"))
    degree = np.bincount(data.user_rows, minlength=fi.n_users)
    for group in model.users.groups:
        big = degree[group.entities.numpy()] > 3
        assert group.blockwise == (not big.any()) and (big.all() or not big.any())
    assert any(g.blockwise for g in model.users.groups) and not all(g.blockwise for g in model.users.groups)
    for cg_steps in (0, 12):
        params = train_icd(data, fi.n_features, replace(hp, cg_steps=cg_steps), device="cpu", progress=False).params
        np.testing.assert_allclose(params.factors, reference.factors, atol=2e-4)
        np.testing.assert_allclose(params.linear, reference.linear, atol=2e-4)


def test_groups_never_hold_two_features_of_one_row() -> None:
    x = sp.csr_matrix(np.array([[1, 0, 1, 1, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 2], [0, 0, 0, 0, 0]], np.float32))
    groups = feature_groups(x)
    assert sorted(np.concatenate(groups).tolist()) == [0, 1, 2, 3, 4]
    for group in groups:
        assert (np.asarray((x[:, group] != 0).sum(axis=1)).ravel() <= 1).all()


def test_empty_or_mismatched_training_data_is_refused() -> None:
    fi, data = small_problem()
    with pytest.raises(InputDataError, match="empty"):
        ImplicitData(fi.user_x, fi.item_x, np.zeros(0, np.int64), np.zeros(0, np.int64))
    with pytest.raises(InputDataError, match="outside"):
        ImplicitData(fi.user_x, fi.item_x, np.array([0, 99]), np.array([0, 1]))
    with pytest.raises(InputDataError, match="positive"):
        ImplicitData(fi.user_x, fi.item_x, data.user_rows, data.item_rows, -data.weight)


def test_a_system_no_precision_can_factor_takes_no_step_and_the_others_are_solved() -> None:
    hess = torch.tensor([[[4.0, 0.0], [0.0, 2.0]],
                         [[1.0, 1.0], [1.0, 1.0]],           # singular: float32 fails, and the float64 retry
                         [[2.0, 1.0], [1.0, 2.0]]])
    grad = torch.tensor([[4.0, 2.0], [1.0, 1.0], [3.0, 3.0]])
    step = _ICD._solve(hess, grad)
    assert torch.allclose(step[0], torch.tensor([1.0, 1.0])) and torch.allclose(step[2], torch.tensor([1.0, 1.0]))
    assert torch.equal(step[1], torch.zeros(2))


def test_a_run_records_hold_out_recall_per_epoch_the_last_equal_to_its_metrics(tmp_path) -> None:
    """The icd learner has no validation loss: each epoch's record carries recall@x on (a sample of) the
    hold-out, by the same ranking as the run's metrics; it is timed apart from training."""
    from topx.cli import main
    from topx.synth import generate

    files = generate(150, 60, mean_interactions=12, implicit=True, seed=4).write(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["run", "--interactions", str(files["interactions"]), "--rating-col", "plays", "--epochs", "4",
                 "--num-factors", "8", "--top-x", "5", "--quiet", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["training"]["history"]
    assert [h["epoch"] for h in history] == [1.0, 2.0, 3.0, 4.0]
    assert all(0.0 <= h["holdout_recall_at_5"] <= 1.0 for h in history)
    assert metrics["ranking_users"] <= 2000  # every hold-out user is in the per-epoch sample
    assert history[-1]["holdout_recall_at_5"] == pytest.approx(metrics["recall_at_5"], abs=1e-12)
    assert metrics["timings_s"]["holdout_per_epoch"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize(("history", "cg_steps"), [(False, 0), (True, 0), (False, 3)])
def test_icd_on_cuda_matches_cpu(history: bool, cg_steps: int) -> None:
    """The same epochs on CUDA give the CPU's model: side features, history features (many groups),
    the exact solve and conjugate gradients. Sums on the GPU run in another order, hence a tolerance."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    fi, data = small_problem(seed=3, history=history)
    hp = hyper(epochs=3, cg_steps=cg_steps)
    cpu = train_icd(data, fi.n_features, hp, device="cpu", progress=False)
    gpu = train_icd(data, fi.n_features, hp, device="cuda", progress=False)
    assert gpu.device.startswith("cuda")
    np.testing.assert_allclose(gpu.params.factors, cpu.params.factors, rtol=0, atol=1e-4)
    np.testing.assert_allclose(gpu.params.linear, cpu.params.linear, rtol=0, atol=1e-4)
    np.testing.assert_allclose(gpu.params.bias, cpu.params.bias, rtol=0, atol=1e-4)
    assert [h["train_loss"] for h in gpu.history] == pytest.approx([h["train_loss"] for h in cpu.history], rel=1e-4)
