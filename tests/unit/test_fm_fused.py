"""The fused training engine takes the same steps as the autograd reference, on every kind of batch."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from topx.config import HyperParameters
from topx.errors import ConfigError
from topx.feature_index import FeatureIndex
from topx.fm import PaddedRows, TrainingData, _plan_batches, predict, train_fm


def side_feature_problem(seed: int = 0, n: int = 3000, explicit_zeros: bool = False):
    """Users and items with one-hot ids plus numeric and multi-hot side features (values != 1)."""
    rng = np.random.default_rng(seed)
    n_users, n_items = 60, 45
    uf = sp.random(n_users, 4, density=0.5, random_state=seed, format="csr", dtype=np.float32)
    itf = sp.random(n_items, 3, density=0.6, random_state=seed + 1, format="csr", dtype=np.float32)
    if explicit_zeros:
        # Stored zeros are present in the design but contribute nothing and are not regularised.
        uf.data[::3] = 0.0
    fi = FeatureIndex.build([f"u{i}" for i in range(n_users)], [f"i{i}" for i in range(n_items)],
                            uf, ["a", "b", "c", "d"], itf, ["p", "q", "r"])
    users, items = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
    y = rng.normal(3.0, 1.0, n).astype(np.float32)
    user_x = fi.user_x.copy()
    if explicit_zeros:
        user_x = sp.csr_matrix((np.where(np.arange(user_x.nnz) % 3 == 0, 0.0, user_x.data).astype(np.float32),
                                user_x.indices, user_x.indptr), shape=user_x.shape)
    data = TrainingData(PaddedRows.from_csr(user_x), PaddedRows.from_csr(fi.item_x), users, items, y)
    return fi, data


def both_engines(data: TrainingData, n_features: int, hp: HyperParameters):
    reference = train_fm(data, n_features, hp, progress=False, engine="autograd")
    fused = train_fm(data, n_features, hp, progress=False, engine="fused")
    return reference, fused


def assert_same_model(reference, fused, atol: float = 2e-5) -> None:
    np.testing.assert_allclose(fused.params.factors, reference.params.factors, rtol=0, atol=atol)
    np.testing.assert_allclose(fused.params.linear, reference.params.linear, rtol=0, atol=atol)
    assert fused.params.bias == pytest.approx(reference.params.bias, abs=atol)
    assert fused.best_epoch == reference.best_epoch
    for a, b in zip(reference.history, fused.history, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6)


def test_regressor_steps_match_the_reference_including_a_short_last_batch():
    fi, data = side_feature_problem()
    # 2700 training rows in batches of 256: ten full batches and a last one of 140.
    hp = HyperParameters(num_factors=5, epochs=4, mini_batch_size=256, factors_init_sigma=0.1)
    assert_same_model(*both_engines(data, fi.n_features, hp))


def test_unequal_learning_rates_and_weight_decays_follow_the_reference():
    fi, data = side_feature_problem(seed=1)
    hp = HyperParameters(num_factors=4, epochs=3, mini_batch_size=100, factors_lr=0.08, linear_lr=0.02,
                         factors_wd=1e-3, linear_wd=0.0, bias_wd=0.01, factors_init_sigma=0.05)
    assert_same_model(*both_engines(data, fi.n_features, hp))


def test_explicit_zeros_in_the_design_are_neither_counted_nor_regularised():
    fi, data = side_feature_problem(seed=2, explicit_zeros=True)
    assert (data.user_table.value == 0).sum() > data.user_table.value.shape[0]  # padding and stored zeros
    hp = HyperParameters(num_factors=3, epochs=3, mini_batch_size=128, factors_wd=0.01, linear_wd=0.01)
    assert_same_model(*both_engines(data, fi.n_features, hp))


def test_classifier_with_sampled_negatives_and_weights_draws_and_steps_like_the_reference():
    rng = np.random.default_rng(3)
    fi, data = side_feature_problem(seed=3, n=2000)
    weighted = TrainingData(data.user_table, data.item_table, data.user_rows, data.item_rows,
                            np.ones(2000, np.float32), rng.uniform(0.5, 2.0, 2000).astype(np.float32))
    hp = HyperParameters(num_factors=4, epochs=3, mini_batch_size=128, predictor_type="binary_classifier",
                         negative_samples=3, factors_init_sigma=0.1)
    assert_same_model(*both_engines(weighted, fi.n_features, hp))


def test_a_feature_shared_by_the_user_and_the_item_row_is_two_slots_as_in_the_reference():
    # Both design tables point at feature 0, so a sample carries it in two slots.
    rng = np.random.default_rng(4)
    user_table = PaddedRows(np.array([[0, 1], [0, 2]]), np.array([[1.0, 1.0], [0.5, 1.0]], np.float32))
    item_table = PaddedRows(np.array([[0, 3], [4, 0]]), np.array([[2.0, 1.0], [1.0, 0.0]], np.float32))
    n = 400
    data = TrainingData(user_table, item_table, rng.integers(0, 2, n), rng.integers(0, 2, n),
                        rng.normal(size=n).astype(np.float32))
    hp = HyperParameters(num_factors=3, epochs=3, mini_batch_size=32, factors_init_sigma=0.2)
    assert_same_model(*both_engines(data, 5, hp))


def test_batches_of_one_sample_and_no_validation_split():
    fi, data = side_feature_problem(seed=5, n=150)
    hp = HyperParameters(num_factors=2, epochs=2, mini_batch_size=1, validation_fraction=0.0)
    reference, fused = both_engines(data, fi.n_features, hp)
    assert_same_model(reference, fused)
    assert fused.best_epoch == 2 and "validation_loss" not in fused.history[0]


def test_fused_engine_recovers_planted_scores():
    rng = np.random.default_rng(6)
    fi, data = side_feature_problem(seed=6, n=20000)
    from topx.params import FMParams

    truth = FMParams(3.0, rng.normal(0, 0.3, fi.n_features), rng.normal(0, 0.4, (fi.n_features, 3)))
    x = fi.user_x[data.user_rows] + fi.item_x[data.item_rows]
    y = predict(truth, x).astype(np.float32)
    planted = TrainingData(data.user_table, data.item_table, data.user_rows, data.item_rows, y)
    hp = HyperParameters(num_factors=3, epochs=30, factors_init_sigma=0.1, linear_wd=0.0, factors_wd=0.0,
                         mini_batch_size=256, early_stopping_patience=5)
    params = train_fm(planted, fi.n_features, hp, progress=False).params
    error = np.sqrt(np.mean((predict(params, x) - y) ** 2))
    assert error < 0.25 * y.std()


def test_the_plan_groups_each_batch_by_feature_row():
    rng = np.random.default_rng(7)
    n_batches, b, width, n_features = 3, 5, 4, 11
    index = torch.as_tensor(rng.integers(0, n_features, (n_batches * b, width)))
    value = torch.as_tensor(rng.random((n_batches * b, width)).astype(np.float32))
    value[0, 0] = 0.0
    plan = _plan_batches(index, value, n_batches, n_features)
    per_batch = b * width
    for c in range(n_batches):
        rows = plan.rows[plan.seg_start[c]:plan.seg_start[c + 1]]
        batch_index = index[c * b:(c + 1) * b].reshape(-1)
        np.testing.assert_array_equal(rows, np.unique(batch_index.numpy()))
        occ = slice(c * per_batch, (c + 1) * per_batch)
        # Each (sample, slot) points at its own feature row.
        np.testing.assert_array_equal(rows[plan.slot_segment[occ]], batch_index)
        # Grouped occurrences: row r's begin at heads[r], and carry that row's values.
        heads = plan.heads[plan.seg_start[c]:plan.seg_start[c + 1]].tolist() + [per_batch]
        samples, values = plan.sample[occ], plan.value[occ]
        batch_value = value[c * b:(c + 1) * b]
        for r, row in enumerate(rows.tolist()):
            group = range(heads[r], heads[r + 1])
            got = sorted((int(samples[t]), float(values[t])) for t in group)
            want = sorted((s, float(batch_value[s, j])) for s in range(b) for j in range(width)
                          if int(index[c * b + s, j]) == row)
            assert got == want
            present = sum(1 for _, v in want if v != 0)
            assert float(plan.present[plan.seg_start[c] + r]) == present


def test_unknown_engine_is_refused_and_thread_setting_is_restored():
    fi, data = side_feature_problem(n=200)
    with pytest.raises(ConfigError, match="engine"):
        train_fm(data, fi.n_features, HyperParameters(epochs=1), progress=False, engine="fast")
    before = torch.get_num_threads()
    train_fm(data, fi.n_features, HyperParameters(num_factors=2, epochs=1), progress=False)
    assert torch.get_num_threads() == before


@pytest.mark.gpu
def test_fused_engine_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    fi, data = side_feature_problem(seed=8)
    hp = HyperParameters(num_factors=4, epochs=2, mini_batch_size=128, predictor_type="binary_classifier")
    cpu = train_fm(data, fi.n_features, hp, device="cpu", progress=False)
    gpu = train_fm(data, fi.n_features, hp, device="cuda", progress=False)
    assert gpu.device.startswith("cuda")
    np.testing.assert_allclose(gpu.params.factors, cpu.params.factors, rtol=0, atol=1e-4)
