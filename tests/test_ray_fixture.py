"""The session Ray is real and local: tasks run in worker processes on this node only."""

import os


def test_ray_runs_tasks_in_other_processes(ray_local):
    @ray_local.remote
    def pid():
        return os.getpid()

    pids = set(ray_local.get([pid.remote() for _ in range(4)]))
    assert os.getpid() not in pids
    nodes = ray_local.nodes()
    assert len(nodes) == 1 and nodes[0]["NodeManagerAddress"] == "127.0.0.1"
