"""Entrypoint submitted by tests/reliability/test_submit.py: the driver, a worker of the
driver's job and a task with the task-level runtime_env each write one object to the S3 root
given as argument, with whatever AWS_* variables reached them; Ray is joined the way
jobs.fill_matrix and jobs.data_efficiency join it."""

import os
import sys

import ray

from jobs._ray_util import init_ray, worker_runtime_env
from t2v_core.storage import StorageRoot


def write(root: str, name: str) -> str:
    return StorageRoot(root).write_bytes_atomic(name, os.environ["AWS_ENDPOINT_URL"].encode())


root = sys.argv[1]
print("driver wrote", write(root, "driver.txt"))
init_ray(None, runtime_env=worker_runtime_env())
remote_write = ray.remote(num_cpus=0)(write)
print("job worker wrote", ray.get(remote_write.remote(root, "job_worker.txt")))
task_env = remote_write.options(runtime_env=worker_runtime_env())
print("task wrote", ray.get(task_env.remote(root, "task.txt")))
