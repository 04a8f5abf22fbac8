"""An expert is a function of its inputs: the same task, base weights, recipe (seed included)
and torch thread count give bit-identical weights, whatever ran before in the process; another
seed gives other weights. Planning skips an expert whose content hash is unchanged on exactly
this promise."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from t2v_core.matrix.expert_training import head_rel, train_expert, weights_rel
from t2v_core.matrix.experts import Recipe
from t2v_core.storage import StorageRoot
from t2v_core.zoo.manifest import read_tasks
from t2v_core.zoo.register import register_folders

SIZE = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def task_root(tmp_path_factory):
    from conftest import write_image_folder

    base = tmp_path_factory.mktemp("repro")
    write_image_folder(base / "folders", "toy__abc", {"a": 6, "b": 6, "c": 6},
                       {"a": 2, "b": 2, "c": 2}, size=SIZE)
    root = StorageRoot(base / "root")
    assert not register_folders(str(base / "folders"), root).skipped
    (task,) = read_tasks(root)
    return root, task


def _disturb_global_rngs(seed: int) -> None:
    """Draw from every process-wide generator, as other work in a worker would."""
    torch.manual_seed(seed)
    torch.rand(seed + 1)
    np.random.seed(seed)
    np.random.rand(seed + 1)
    random.seed(seed)


def _train(root: StorageRoot, task, arch: str, recipe: Recipe, expert_id: str
           ) -> tuple[dict, dict[str, torch.Tensor], bytes]:
    out = train_expert(root.uri, arch, None, task, recipe, expert_id)
    state = torch.load(io.BytesIO(root.read_bytes(weights_rel(expert_id))), map_location="cpu",
                       weights_only=True)
    return out, state, root.read_bytes(head_rel(expert_id))


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("arch", "recipe"),
    [
        # whole network, shifted images, a seeded subset of the images per class
        ("small_cnn", Recipe(epochs=2, batch_size=4, image_size=SIZE, max_per_class=4, seed=5)),
        # the demo's architecture, last blocks only (its BN affines train, statistics frozen)
        ("efficientnet_lite0", Recipe(epochs=1, batch_size=6, image_size=SIZE, train_last=2,
                                      seed=5)),
    ],
)
def test_same_seed_gives_bit_identical_experts_and_another_seed_does_not(task_root, arch, recipe):
    root, task = task_root
    _disturb_global_rngs(1)
    first, state, head = _train(root, task, arch, recipe, f"{arch}__first")
    _disturb_global_rngs(2)
    again, state_again, head_again = _train(root, task, arch, recipe, f"{arch}__again")
    assert again["digest"] == first["digest"]
    assert _same_tensors(state, state_again)
    assert head == head_again
    assert again["train_error"] == first["train_error"]

    other_seed = Recipe(**{**recipe.__dict__, "seed": recipe.seed + 1})
    other, state_other, head_other = _train(root, task, arch, other_seed, f"{arch}__other")
    assert other["digest"] != first["digest"]
    assert not _same_tensors(state, state_other)
    assert head_other != head
