"""One embedding run over a zoo, up to the point where tasks are handed out: the tasks it
selects, which of them are missing, the writer of their outcomes, and the probe a worker
process rebuilds once and reuses. Errors reading the storage root say which root."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from t2v_core.embedding.fisher import filter_names
from t2v_core.embedding.probes import Probe
from t2v_core.embedding.store import (
    TRANSIENT_ERRORS,
    EmbedConfig,
    EmbeddingStorageError,
    EmbeddingWriter,
    EmbedPlan,
    TaskOutcome,
    plan_embeddings,
    probe_from_state,
)
from t2v_core.storage import StorageRoot, redact_uri
from t2v_core.zoo.manifest import TaskSpec, read_tasks, select_specs

log = logging.getLogger(__name__)


class ZooSelectionError(RuntimeError):
    """The zoo has no tasks, or the task patterns select none of them."""


def zoo_tasks(root: StorageRoot, patterns: str | None) -> list[TaskSpec]:
    """The registered tasks that ``patterns`` (ids or globs, comma-separated) select."""
    where = redact_uri(root.uri)
    try:
        tasks = read_tasks(root)
    except TRANSIENT_ERRORS as exc:
        raise EmbeddingStorageError(
            f"cannot read the zoo manifest under {where}: {type(exc).__name__}: {exc}") from exc
    if not tasks:
        raise ZooSelectionError(f"no tasks registered under {where}; run jobs.register_zoo first")
    try:
        return select_specs(tasks, patterns)
    except ValueError as exc:
        raise ZooSelectionError(f"--tasks: {exc}") from exc


@dataclass(frozen=True)
class EmbedRun:
    """What a run must embed, and the writer that its outcomes go to; the writer's summary
    starts with the tasks the plan skips."""

    plan: EmbedPlan
    writer: EmbeddingWriter

    @classmethod
    def start(cls, root: StorageRoot, tasks: Sequence[TaskSpec], probe: Probe, method: str,
              recipe: EmbedConfig, *, retry_failed: bool = False, **writer_options
              ) -> EmbedRun:
        """``recipe`` resolved against ``probe``; ``writer_options`` go to
        :class:`EmbeddingWriter` (batch_size, max_wait_s, write_retries)."""
        where = redact_uri(root.uri)
        try:
            plan = plan_embeddings(root, tasks, probe.probe_id, method, config=recipe,
                                   retry_failed=retry_failed)
        except TRANSIENT_ERRORS as exc:
            raise EmbeddingStorageError(
                f"cannot read existing embeddings under {where}: {type(exc).__name__}: {exc}"
            ) from exc
        log.info("%s/%s under %s: %d task(s) to embed, %d up to date, %d failed before",
                 probe.probe_id, method, where, len(plan.todo), len(plan.up_to_date),
                 len(plan.failed_before))
        writer = EmbeddingWriter(root, probe.probe_id, method, filter_names(probe.backbone),
                                 config=recipe, **writer_options)
        writer.summary.up_to_date = list(plan.up_to_date)
        writer.summary.failed_before = dict(plan.failed_before)
        return cls(plan, writer)

    def collect(self, batches: Iterable[list[TaskOutcome]], *,
                progress: Callable[[int], object] = lambda n: None,
                stop: Callable[[], object] = lambda: None) -> None:
        """Hand outcomes to the writer as they arrive, a batch (possibly empty) at a time,
        writing what is due after each batch and the rest at the end. When anything raises,
        ``stop()`` stops the tasks still running; unless storage failed, the finished
        outcomes are written before the error goes on."""
        try:
            for batch in batches:
                for outcome in batch:
                    if not outcome.ok:
                        log.warning("task %s failed: %s: %s", outcome.task_id,
                                    outcome.error_type, outcome.error)
                    self.writer.add(outcome)
                    progress(1)
                self.writer.flush_if_due()
            self.writer.flush()
        except EmbeddingStorageError:
            stop()
            raise
        except BaseException:
            stop()  # interrupted: stop the rest, keep what is done
            try:
                self.writer.flush()
            except Exception as exc:
                log.error("could not write the last batch: %s", exc)
            raise

    def log_summary(self) -> None:
        first, *rest = self.writer.summary.lines()
        log.info("%s", first)
        for line in rest:
            log.warning("%s", line)


_WORKER_PROBE: dict[tuple, Probe] = {}


def worker_probe(arch: str, probe_id: str, input_size: int,
                 load_state: Callable[[], dict[str, torch.Tensor]], want_gpu: bool) -> Probe:
    """The probe a worker process embeds with, rebuilt from ``load_state()`` on first use and
    kept (one probe per process); on CUDA when wanted and available."""
    device = "cuda" if want_gpu and torch.cuda.is_available() else "cpu"
    if want_gpu and device == "cpu":
        log.warning("GPU requested but CUDA is not available on this worker; using the CPU")
    key = (probe_id, input_size, device)
    probe = _WORKER_PROBE.get(key)
    if probe is None:
        _WORKER_PROBE.clear()
        probe = probe_from_state(arch, load_state(), probe_id, input_size)
        probe.backbone.to(device)
        _WORKER_PROBE[key] = probe
    return probe
