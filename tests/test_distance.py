"""Distances: definitions, symmetry, asymmetry, and the vectorized matrices vs a plain loop."""

import numpy as np
import pytest

from t2v_core.embedding.distance import (
    complexity,
    cosine,
    d_asym,
    d_sym,
    normalized_cosine,
    trivial_embedding,
    trivial_level,
)


def _d_sym_loop(a, b):
    u, v = a / (a + b), b / (a + b)
    return 1 - u @ v / (np.linalg.norm(u) * np.linalg.norm(v))


@pytest.fixture
def emb():
    rng = np.random.default_rng(0)
    return rng.gamma(0.5, 1.0, size=(7, 50)).astype(np.float32) + 1e-6


def test_d_sym_matrix_matches_definition(emb):
    mat = d_sym(emb)
    loop = np.array([[_d_sym_loop(a.astype(np.float64), b.astype(np.float64)) for b in emb]
                     for a in emb])
    np.fill_diagonal(loop, 0.0)
    assert np.allclose(mat, loop, atol=1e-5)
    assert np.allclose(mat, mat.T, atol=1e-6)
    assert np.all(np.diag(mat) == 0) and np.all(mat >= 0)
    assert d_sym(emb[0], emb[1]) == pytest.approx(loop[0, 1], abs=1e-5)
    assert d_sym(emb[:3], emb).shape == (3, 7)


def test_d_sym_is_scale_invariant_per_pair_but_not_per_filter(emb):
    a, b = emb[0], emb[1]
    assert d_sym(3 * a, 3 * b) == pytest.approx(d_sym(a, b), abs=1e-6)
    w = np.linspace(1, 100, emb.shape[1]).astype(np.float32)
    assert d_sym(w * a, w * b) == pytest.approx(d_sym(a, b), abs=1e-6)  # per-filter ratio


def test_d_asym_is_not_symmetric_and_favours_complex_sources(emb):
    t0 = trivial_embedding(emb.shape[1], trivial_level(emb))
    mat = d_asym(emb, t0=t0, alpha=0.15)
    assert not np.allclose(mat, mat.T, atol=1e-4)
    base = d_sym(emb)
    share = (emb / (emb + t0)).mean(axis=1)  # the definition of complexity
    assert np.allclose(complexity(emb, t0), share, atol=1e-6)
    assert np.allclose(mat, base - 0.15 * share[:, None], atol=1e-6)
    assert np.allclose(d_asym(emb, t0=t0, alpha=0.0), base, atol=1e-6)
    # closed forms: no information is 0, the trivial task itself is ½
    assert complexity(np.zeros(emb.shape[1]), t0) == pytest.approx(0.0)
    assert complexity(t0, t0) == pytest.approx(0.5)


def _real_looking(rng, dim=600):
    """A Fisher profile like a real probe's: values from the 1e-10 floor to 1e4, log-uniform
    across layers, with dead filters at the floor."""
    values = 10.0 ** rng.uniform(-10, 4, size=dim)
    values[rng.random(dim) < 0.05] = 1e-10
    return values


@pytest.mark.parametrize("seed", range(5))
def test_complexity_rises_when_a_tasks_fisher_is_scaled_up(seed):
    """Uniform scaling of a task's Fisher must raise its complexity, at every scale, on a
    profile spanning 14 orders of magnitude; d_sym(F, t0), the term it replaces, does not (it
    compares shapes: a faint task's shares are as uneven as a rich one's)."""
    rng = np.random.default_rng(seed)
    task = _real_looking(rng)
    t0 = trivial_embedding(task.size, trivial_level(np.stack([_real_looking(rng) for _ in range(9)])))
    scales = 10.0 ** np.arange(-6.0, 6.5, 0.5)
    values = np.array([complexity(s * task, t0) for s in scales])
    assert (np.diff(values) > 0).all()
    assert values[0] < 0.3 < 0.7 < values[-1]
    flat = np.array([d_sym(s * task, t0) for s in scales])
    assert (np.diff(flat) < 0).any() and (np.diff(flat) > 0).any()


def test_cosine_variants(emb):
    c = cosine(emb)
    ref = 1 - (emb @ emb.T) / np.outer(np.linalg.norm(emb, axis=1), np.linalg.norm(emb, axis=1))
    np.fill_diagonal(ref, 0)
    assert np.allclose(c, ref, atol=1e-5)
    scaled = emb * np.linspace(1, 1000, emb.shape[1]).astype(np.float32)
    # normalized cosine removes a per-filter scale shared by the whole set
    assert np.allclose(normalized_cosine(scaled), normalized_cosine(emb), atol=1e-4)
    assert not np.allclose(cosine(scaled), cosine(emb), atol=1e-3)


def test_bad_embeddings_are_rejected(emb):
    bad = emb.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        d_sym(bad)
    with pytest.raises(ValueError, match="non-negative"):
        d_sym(-emb)
    with pytest.raises(ValueError, match="dimension"):
        d_sym(emb, emb[:, :10])


def test_rectangular_and_symmetric_paths_agree(emb):
    # the symmetric path fills a triangle with interleaved rows; the rectangular one all pairs
    assert np.allclose(d_sym(emb), d_sym(emb, emb.copy()) * (1 - np.eye(len(emb))), atol=1e-6)
    odd = emb[:5]
    assert np.allclose(d_sym(odd), d_sym(emb)[:5, :5], atol=1e-7)


def test_zero_filters_share_equally():
    """A filter where both tasks are 0 counts as an even split, u = v = 1/2, by hand:
    u = (1/4, 1/2, 2/3), v = (3/4, 1/2, 1/3)."""
    a = np.array([1.0, 0.0, 2.0], dtype=np.float32)
    b = np.array([3.0, 0.0, 1.0], dtype=np.float32)
    u = np.array([1 / 4, 1 / 2, 2 / 3])
    v = 1 - u
    expected = 1 - u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    assert d_sym(a, b) == pytest.approx(expected, abs=1e-6)
    # the zero filter is not dropped: without it the distance differs
    assert abs(d_sym(a[[0, 2]], b[[0, 2]]) - expected) > 0.05
