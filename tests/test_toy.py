"""The unit-square toy: tasks that share tiles embed closer than tasks that do not."""

import itertools

import numpy as np

from t2v_core.embedding.distance import d_sym
from t2v_core.embedding.fisher import task2vec
from t2v_core.embedding.toy import tile_task, unit_square_probe


def test_tasks_sharing_tiles_are_closer():
    probe = unit_square_probe(n_features=10, seed=0)
    # 2-tile tasks on a 4×4 grid, chosen so that some pairs share a tile and some do not
    tasks = [{0, 1}, {1, 2}, {0, 4}, {10, 11}, {11, 15}, {14, 15}, {5, 6}, {6, 10}]
    emb = np.stack([
        task2vec(probe, *tile_task(t, n=600, seed=i), method="expected").vector
        for i, t in enumerate(tasks)
    ])
    assert emb.shape == (len(tasks), 10)
    dist = d_sym(emb)
    sharing, disjoint = [], []
    for i, j in itertools.combinations(range(len(tasks)), 2):
        (sharing if tasks[i] & tasks[j] else disjoint).append(dist[i, j])
    assert np.mean(sharing) < np.mean(disjoint), (np.mean(sharing), np.mean(disjoint))
