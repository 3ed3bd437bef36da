"""The FM trainer: planted weights are recovered, runs are reproducible, bad settings are refused."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from topx.config import HyperParameters
from topx.errors import ConfigError, InputDataError
from topx.feature_index import FeatureIndex
from topx.fm import PaddedRows, TrainingData, pick_device, predict, train_fm
from topx.params import FMParams


def planted_problem(seed: int = 0, n: int = 30000, noise: float = 0.05):
    rng = np.random.default_rng(seed)
    n_users, n_items, k = 150, 100, 3
    uf = sp.csr_matrix(rng.integers(0, 2, (n_users, 3)).astype(np.float32))
    itf = sp.csr_matrix(rng.random((n_items, 2)).astype(np.float32))
    fi = FeatureIndex.build([f"u{i}" for i in range(n_users)], [f"i{i}" for i in range(n_items)],
                            uf, ["a", "b", "c"], itf, ["p", "q"])
    truth = FMParams(3.0, rng.normal(0, 0.3, fi.n_features), rng.normal(0, 0.4, (fi.n_features, k)))
    users, items = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
    y = predict(truth, fi.user_x[users] + fi.item_x[items]).astype(np.float32)
    y += rng.normal(0, noise, n).astype(np.float32)
    data = TrainingData(PaddedRows.from_csr(fi.user_x), PaddedRows.from_csr(fi.item_x), users, items, y)
    return fi, truth, data


def test_padded_rows_keep_every_entry():
    m = sp.csr_matrix(np.array([[0, 2.0, 0, 1.0], [0, 0, 0, 0], [3.0, 0, 0, 0]], dtype=np.float32))
    rows = PaddedRows.from_csr(m)
    assert rows.index.shape == (3, 2)
    rebuilt = np.zeros((3, 4), np.float32)
    for r in range(3):
        np.add.at(rebuilt[r], rows.index[r], rows.value[r])
    np.testing.assert_array_equal(rebuilt, m.toarray())


def test_predict_matches_the_pairwise_definition():
    rng = np.random.default_rng(1)
    params = FMParams(0.5, rng.normal(size=6), rng.normal(size=(6, 3)))
    x = rng.random((4, 6)) * (rng.random((4, 6)) < 0.5)
    expected = []
    for row in x:
        total = params.bias + params.linear.astype(np.float64) @ row
        for j in range(6):
            for m in range(j + 1, 6):
                total += params.factors[j].astype(np.float64) @ params.factors[m] * row[j] * row[m]
        expected.append(total)
    np.testing.assert_allclose(predict(params, sp.csr_matrix(x)), expected, rtol=1e-10)


def test_training_recovers_planted_scores():
    fi, truth, data = planted_problem()
    hp = HyperParameters(num_factors=3, epochs=40, factors_lr=0.05, linear_lr=0.05, factors_init_sigma=0.1,
                         linear_wd=0.0, factors_wd=0.0, early_stopping_patience=5)
    result = train_fm(data, fi.n_features, hp, progress=False)
    rng = np.random.default_rng(99)
    users, items = rng.integers(0, fi.n_users, 2000), rng.integers(0, fi.n_items, 2000)
    x = fi.user_x[users] + fi.item_x[items]
    target = predict(truth, x)
    error = np.sqrt(np.mean((predict(result.params, x) - target) ** 2))
    # A constant predictor scores target.std() (about 1.2 here); a recovered model is far below it.
    assert error < 0.25 * target.std()
    assert result.history[0]["validation_loss"] > result.history[result.best_epoch - 1]["validation_loss"]


def test_training_is_reproducible_with_a_seed():
    fi, _, data = planted_problem(n=3000)
    hp = HyperParameters(num_factors=3, epochs=3, seed=5)
    a = train_fm(data, fi.n_features, hp, progress=False).params
    b = train_fm(data, fi.n_features, hp, progress=False).params
    np.testing.assert_array_equal(a.factors, b.factors)
    np.testing.assert_array_equal(a.linear, b.linear)
    c = train_fm(data, fi.n_features, HyperParameters(num_factors=3, epochs=3, seed=6), progress=False).params
    assert not np.array_equal(a.factors, c.factors)


def test_early_stopping_ends_before_the_epoch_limit_on_noise():
    rng = np.random.default_rng(3)
    fi = FeatureIndex.one_hot([f"u{i}" for i in range(50)], [f"i{i}" for i in range(50)])
    users, items = rng.integers(0, 50, 4000), rng.integers(0, 50, 4000)
    data = TrainingData(PaddedRows.from_csr(fi.user_x), PaddedRows.from_csr(fi.item_x), users, items,
                        rng.normal(size=4000).astype(np.float32))
    hp = HyperParameters(num_factors=8, epochs=60, factors_lr=0.2, linear_lr=0.2, early_stopping_patience=2,
                         factors_wd=0.0, linear_wd=0.0)
    result = train_fm(data, fi.n_features, hp, progress=False)
    assert len(result.history) < 60
    assert result.best_epoch == min(range(1, len(result.history) + 1),
                                    key=lambda e: result.history[e - 1]["validation_loss"])


def test_classifier_ranks_positives_above_random_items():
    rng = np.random.default_rng(4)
    n_users, n_items = 200, 80
    fi = FeatureIndex.one_hot([f"u{i}" for i in range(n_users)], [f"i{i}" for i in range(n_items)])
    # Two planted groups: even users like even items, odd users like odd items.
    users = rng.integers(0, n_users, 6000)
    items = (rng.integers(0, n_items // 2, 6000) * 2 + users % 2) % n_items
    data = TrainingData(PaddedRows.from_csr(fi.user_x), PaddedRows.from_csr(fi.item_x), users, items,
                        np.ones(6000, np.float32))
    hp = HyperParameters(num_factors=4, epochs=15, predictor_type="binary_classifier", factors_lr=0.1,
                         linear_lr=0.05, factors_init_sigma=0.1)
    params = train_fm(data, fi.n_features, hp, progress=False).params
    u = np.repeat(np.arange(n_users), n_items)
    i = np.tile(np.arange(n_items), n_users)
    scores = predict(params, fi.user_x[u] + fi.item_x[i]).reshape(n_users, n_items)
    liked = (np.arange(n_items)[None, :] % 2) == (np.arange(n_users)[:, None] % 2)
    assert scores[liked].mean() > scores[~liked].mean() + 1.0


def test_empty_and_inconsistent_training_data_are_refused():
    fi = FeatureIndex.one_hot(["a"], ["b"])
    table_u, table_i = PaddedRows.from_csr(fi.user_x), PaddedRows.from_csr(fi.item_x)
    empty = np.zeros(0, np.int64)
    with pytest.raises(InputDataError, match="empty"):
        TrainingData(table_u, table_i, empty, empty, np.zeros(0, np.float32))
    bad = TrainingData(table_u, table_i, np.array([0]), np.array([0]), np.array([np.nan], np.float32))
    with pytest.raises(InputDataError, match="NaN"):
        train_fm(bad, fi.n_features, HyperParameters(epochs=1), progress=False)


def test_device_choice():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError):
        pick_device("tpu")


@pytest.mark.gpu
def test_cuda_training_matches_cpu_closely():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    fi, _, data = planted_problem(n=5000)
    hp = HyperParameters(num_factors=3, epochs=3)
    cpu = train_fm(data, fi.n_features, hp, device="cpu", progress=False).params
    gpu = train_fm(data, fi.n_features, hp, device="cuda", progress=False).params
    assert gpu.factors.shape == cpu.factors.shape
    assert np.isfinite(gpu.factors).all()


def test_hyperparameters_refuse_bad_values_and_read_sagemaker_strings():
    with pytest.raises(ConfigError, match="num_factors"):
        HyperParameters(num_factors=0)
    with pytest.raises(ConfigError, match="predictor_type"):
        HyperParameters(predictor_type="ranker")
    hp = HyperParameters.from_dict({"num_factors": "16", "epochs": "5", "factors_lr": "0.02"})
    assert (hp.num_factors, hp.epochs, hp.factors_lr) == (16, 5, 0.02)
    with pytest.raises(ConfigError, match="unknown"):
        HyperParameters.from_dict({"feature_dim": 10})
