"""The Fisher engine against closed forms, a naive oracle, and the invariances it must have."""

import numpy as np
import pytest
import torch
from torch import nn

from t2v_core.embedding.fisher import (
    FLOOR,
    FisherError,
    domain_embedding,
    fit_head,
    per_filter_fisher,
    per_filter_fisher_naive,
    task2vec,
    variational_fisher,
)
from t2v_core.embedding.probes import build_probe, extract_features


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _l2rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def small_task():
    torch.manual_seed(0)
    probe = build_probe("small_cnn", seed=1)
    images = torch.randn(24, 3, 16, 16)
    labels = torch.arange(24) % 4
    # make the labels partly learnable so the head is confident on some samples only
    images[labels == 0, 0] += 1.5
    head = fit_head(extract_features(probe.backbone, images), labels, 4, epochs=100)
    return probe, head, images, labels


def _linear_probe(features: torch.Tensor, weight: torch.Tensor) -> nn.Module:
    """A 'network' that is just a linear softmax layer on fixed features, as a 1×1 conv."""
    d = features.shape[1]
    conv = nn.Conv2d(d, weight.shape[0], 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight[:, :, None, None])
    conv.requires_grad_(False)
    return nn.Sequential(nn.Unflatten(1, (d, 1, 1)), conv, nn.Flatten())


@pytest.mark.parametrize("n_classes", [2, 5])
def test_expected_fisher_matches_two_layer_closed_form(n_classes):
    torch.manual_seed(n_classes)
    n, d = 40, 6
    phi = torch.randn(n, d, dtype=torch.float64).float()
    weight = torch.randn(n_classes, d)
    probs = torch.softmax(phi.double() @ weight.double().T, 1)
    # closed form: F = 1/N Σ (diag(p) − ppᵀ) ⊗ φφᵀ, row-major over (class, feature)
    full = sum(
        torch.kron(torch.diag(p) - torch.outer(p, p), torch.outer(f, f))
        for p, f in zip(probs, phi.double(), strict=True)
    ) / n
    # the same matrix from per-sample, per-class gradients (independent of the formula)
    w = weight.clone().double().requires_grad_(True)
    brute = torch.zeros(n_classes * d, n_classes * d, dtype=torch.float64)
    for f in phi.double():
        logp = torch.log_softmax(w @ f, 0)
        p = logp.exp().detach()
        for c in range(n_classes):
            (g,) = torch.autograd.grad(logp[c], w, retain_graph=True)
            brute += p[c] * torch.outer(g.flatten(), g.flatten())
    brute /= n
    assert torch.allclose(full, brute, atol=1e-10)
    if n_classes == 2:  # binary: diag(p) − ppᵀ = p(1−p)·[[1,−1],[−1,1]]
        p1 = probs[:, 1]
        binary = (p1 * (1 - p1))[:, None, None] * phi.double()[:, :, None] * phi.double()[:, None, :]
        assert torch.allclose(full[:d, :d], binary.mean(0), atol=1e-10)
    # the engine: one value per filter (= per class row) = mean of that block's diagonal
    ours = per_filter_fisher(_linear_probe(phi, weight), nn.Identity(), phi, method="expected")
    expected = full.diagonal().reshape(n_classes, d).mean(1).numpy()
    assert _rel(ours, expected) < 1e-5


@pytest.mark.parametrize("method", ["expected", "empirical"])
@pytest.mark.parametrize("include_bn", [False, True])
def test_hook_fisher_equals_naive_per_sample_loop(small_task, method, include_bn):
    probe, head, images, labels = small_task
    fast = per_filter_fisher(probe.backbone, head, images, labels, method=method,
                             include_bn=include_bn, batch_size=7)
    naive = per_filter_fisher_naive(probe.backbone, head, images, labels, method=method,
                                    include_bn=include_bn)
    assert fast.shape == naive.shape
    assert _rel(fast, naive) < 1e-5


def test_ghost_norm_and_direct_forms_agree():
    # a layer with more filters than output positions takes the ghost-norm path
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 64, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(64, 8, 2, groups=8 // 8), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(10, 3, 6, 6)
    net(x)
    net.requires_grad_(False)
    labels = torch.randint(0, 3, (10,))
    fast = per_filter_fisher(net, nn.Identity(), x, labels, method="expected")
    naive = per_filter_fisher_naive(net, nn.Identity(), x, labels, method="expected")
    assert _rel(fast, naive) < 1e-5


def test_grouped_conv_matches_naive():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 3))
    net.requires_grad_(False)
    x = torch.randn(9, 4, 5, 5)
    labels = torch.randint(0, 3, (9,))
    fast = per_filter_fisher(net, nn.Identity(), x, labels, method="expected")
    naive = per_filter_fisher_naive(net, nn.Identity(), x, labels, method="expected")
    assert _rel(fast, naive) < 1e-5


def test_squares_per_sample_gradients_not_the_batch_mean(small_task):
    probe, head, images, labels = small_task
    per_sample = per_filter_fisher(probe.backbone, head, images, labels, method="empirical")
    # square of the batch-mean gradient, computed directly: a different (much smaller) quantity
    params = [m.weight for m in probe.backbone.modules() if isinstance(m, nn.Conv2d)]
    for p in params:
        p.requires_grad_(True)
    logp = torch.log_softmax(head(probe.backbone(images)), 1)[torch.arange(len(labels)), labels]
    grads = torch.autograd.grad(logp.mean(), params)
    for p in params:
        p.requires_grad_(False)
    squared_mean = np.concatenate([g.pow(2).flatten(1).mean(1).numpy() for g in grads])
    assert per_sample[: len(squared_mean)].sum() > 3 * squared_mean.sum()


def test_montecarlo_converges_to_expected_and_empirical_differs(small_task):
    probe, _, images, _ = small_task
    # random labels and a short fit: the head is uncertain, so the true label is often not
    # the likely one and the three estimators can be told apart
    labels = torch.randint(0, 4, (len(images),), generator=torch.Generator().manual_seed(5))
    head = fit_head(extract_features(probe.backbone, images), labels, 4, epochs=3)
    expected = per_filter_fisher(probe.backbone, head, images, labels, method="expected")
    errors = [
        _l2rel(per_filter_fisher(probe.backbone, head, images, labels, method="montecarlo",
                                 mc_samples=s, seed=11), expected)
        for s in (1, 16, 256)
    ]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.1, errors
    empirical = per_filter_fisher(probe.backbone, head, images, labels, method="empirical")
    assert _l2rel(empirical, expected) > 2 * errors[2]


def test_label_permutation_and_duplication_leave_embedding_unchanged(small_task):
    probe, _, images, labels = small_task
    base = task2vec(probe, images, labels, method="expected").vector
    perm = torch.tensor([2, 0, 3, 1])
    permuted = task2vec(probe, images, perm[labels], method="expected").vector
    doubled = task2vec(probe, torch.cat([images, images]), torch.cat([labels, labels]),
                       method="expected").vector
    assert _rel(permuted, base) < 1e-4
    assert _rel(doubled, base) < 1e-4


def test_task2vec_result_and_bad_input(small_task):
    probe, _, images, labels = small_task
    emb = task2vec(probe, images, labels, method="montecarlo", task_id="t1", include_bn=True)
    assert emb.dim == len(emb.filter_names) == 2 * (16 + 32 + 32)
    assert emb.vector.dtype == np.float32 and (emb.vector > 0).all()
    assert emb.probe_id == probe.probe_id and emb.n_samples == len(labels)
    with pytest.raises(FisherError, match="t-one.*two classes"):
        task2vec(probe, images, torch.zeros(len(labels), dtype=torch.long), task_id="t-one")
    nan_images = images.clone()
    nan_images[0, 0, 0, 0] = float("nan")
    with pytest.raises(FisherError, match="t-nan"):
        task2vec(probe, nan_images, labels, task_id="t-nan")
    with pytest.raises(ValueError, match="unknown Fisher method"):
        task2vec(probe, images, labels, method="diagonal")


def test_dead_filters_get_a_floor_not_zero():
    probe = build_probe("small_cnn", seed=0)
    with torch.no_grad():
        probe.backbone.features[0].weight[0].zero_()  # filter 0 of layer 0 is dead downstream
        probe.backbone.features[1].weight[0] = 0.0
        probe.backbone.features[1].bias[0] = -1.0
    images = torch.randn(16, 3, 8, 8)
    emb = task2vec(probe, images, torch.arange(16) % 2, method="expected")
    assert np.isfinite(emb.vector).all() and (emb.vector > 0).all()
    # the dead filter sits exactly at the floor, and it alone: the others carry a gradient
    assert emb.filter_names[0] == "features.0:conv:0"
    assert emb.vector[0] == np.float32(FLOOR)
    assert (emb.vector[1:] > FLOOR).all()


def test_variational_agrees_with_expected_fisher_ranking(small_task):
    from scipy.stats import spearmanr

    probe, head, images, labels = small_task
    expected = per_filter_fisher(probe.backbone, head, images, labels, method="expected")
    robust = variational_fisher(probe.backbone, head, images, labels, seed=0)
    assert robust.shape == expected.shape and (robust > 0).all()
    # a stochastic optimum of a different objective: it agrees in ranking, not in value
    rho = spearmanr(robust, expected).statistic
    assert rho > 0.4, rho


def test_domain_embedding_is_second_moment():
    phi = torch.randn(50, 4)
    diag = domain_embedding(phi)
    full = domain_embedding(phi, full=True)
    assert np.allclose(full, (phi.T @ phi).double().numpy() / 50, atol=1e-6)
    assert np.allclose(np.diag(full), diag)


def test_resnet34_embedding_has_one_value_per_filter():
    probe = build_probe("resnet34", seed=0)
    images = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 0, 1])
    conv = task2vec(probe, images, labels, method="montecarlo", batch_size=4)
    assert conv.dim == 8512
    with_bn = per_filter_fisher(probe.backbone, fit_head(torch.randn(4, 512), labels, 2),
                                images, labels, include_bn=True, batch_size=4)
    assert with_bn.shape == (17024,)


def test_estimators_give_back_each_module_its_own_mode(small_task):
    """BatchNorm must run on running statistics inside the estimators, and the caller's
    train/eval modes come back afterwards, also when the estimator fails half-way."""
    probe, head, images, labels = small_task
    seen = []
    hook = probe.backbone.register_forward_pre_hook(lambda m, _: seen.append(m.training))
    probe.backbone.train()
    head.eval()
    try:
        per_filter_fisher(probe.backbone, head, images[:4], method="expected")
        per_filter_fisher_naive(probe.backbone, head, images[:2], method="expected")
        variational_fisher(probe.backbone, head, images[:4], labels[:4], steps=2)
        assert probe.backbone.training and not head.training
        with pytest.raises(ValueError, match="unknown Fisher method"):
            per_filter_fisher(probe.backbone, head, images[:4], method="nope")
        assert probe.backbone.training and not head.training
    finally:
        hook.remove()
        probe.backbone.eval()
    assert seen and not any(seen)


@pytest.mark.slow
def test_variational_prior_pull_weakens_as_the_task_grows():
    """On a linear softmax model (quadratic loss near the optimum for small noise) the
    variational precision is the closed form λ + (N/β) F̄ per filter, F̄ the expected Fisher
    per image: the same images repeated 8 times (the same per-image loss, 8× N) move it
    8× further from the prior. A KL weighted by β/D instead would not depend on N at all."""
    torch.manual_seed(0)
    n, d, classes, beta, prior = 64, 6, 3, 0.25, 50.0
    phi = torch.randn(n, d)
    weight = 0.5 * torch.randn(classes, d)
    backbone = _linear_probe(phi, weight)
    labels = torch.distributions.Categorical(logits=phi @ weight.T).sample()
    head = nn.Identity()
    fisher = per_filter_fisher(backbone, head, phi, labels, method="expected")
    got = {}
    for repeat in (1, 8):
        images, targets = phi.repeat(repeat, 1), labels.repeat(repeat)
        got[repeat] = variational_fisher(backbone, head, images, targets, steps=1500,
                                         batch_size=64, lr=0.05, beta=beta,
                                         prior_precision=prior, seed=0)
        closed = prior + repeat * n / beta * fisher
        assert np.allclose(got[repeat], closed, rtol=0.25), (got[repeat], closed)
    ratio = (got[8] - prior) / (got[1] - prior)
    assert ((ratio > 5) & (ratio < 12)).all(), ratio
    share = prior / got[1], prior / got[8]  # the prior's part of the precision
    assert (share[1] < 0.5 * share[0]).all()
