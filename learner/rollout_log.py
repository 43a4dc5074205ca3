"""The rollout log: every scored group the learner trains on or drops, as Parquet parts under
`<run_dir>/rollouts/` (docs/rollouts.md has the schema and how to read it).

One row per sample, not per group: what people filter on is a completion (its reward, verdict, text, length),
and pandas/SQL then need no explode; the group's fields repeat on each of its rows, which Parquet's dictionary
encoding and zstd take back (the tiny run: ~1 KB a sample with text). Replay regroups rows by `step`,
`group_index` and `sample_index` (learner/replay.py).

Off the training path: rank 0 hands each step's groups (references, no copy) to a bounded queue and returns; a
daemon thread turns them into Arrow columns and writes a part every `flush_steps` steps or `max_rows_per_file`
rows (to a dot-file first, then renamed, so a reader never sees half a part). When the queue is full the rows
are dropped and counted (`rollout/log_rows_lost`) instead of making training wait, and so are rows past
`max_mb`. A failing writer (disk full) logs once and counts the rest as lost: the log never stops a run.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from broker.schemas import ScoredGroup
from learner.config import GRPOConfig
from learner.runtime_config import RolloutLogConfig

log = logging.getLogger(__name__)

ROLLOUT_DIR = "rollouts"
"""The log's directory under the run directory."""
PART_RE = re.compile(r"^part-(\d+)-steps-(\d+)-(\d+)\.parquet$")
"""part-<seq>-steps-<first>-<last>.parquet: seq orders the parts (a resumed learner continues it)."""
CLOSE_TIMEOUT_S = 120.0
"""How long `close` waits for the writer to drain its queue before giving up on what is left."""

_STOP = object()

# (name, arrow type name) in column order; docs/rollouts.md describes each.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("step", "int32"),  # step that trained it (metrics.jsonl's step), or whose collection dropped it
    ("dropped_reason", "string"),  # null: trained; else stale | zero_variance | duplicate | ...
    ("group_index", "int32"),  # position of the group in the step's batch (-1: dropped)
    ("sample_index", "int32"),  # position of the sample in its group
    ("group_id", "string"),
    ("prompt_id", "string"),
    ("batch_id", "string"),
    ("policy_version", "int32"),  # version whose weights sampled it
    ("staleness", "int32"),  # learner version when trained or dropped - policy_version
    ("worker_id", "string"),
    ("judge_id", "string"),
    ("temperature", "float32"),
    ("prompt_ids", "list<int32>"),
    ("prompt_text", "string"),  # null when keep_text is off
    ("ground_truth", "string"),
    ("completion_ids", "list<int32>"),
    ("completion_text", "string"),  # null when keep_text is off
    ("finish_reason", "string"),
    ("behaviour_logprobs", "list<float32>"),  # [len(completion_ids)], as sampled
    ("reward", "float32"),  # the judge's, before reward shaping
    ("advantage", "float32"),  # as the learner computes it (shaping included)
    ("verdict", "string"),
    ("judge_verify_s", "float64"),  # ScoredGroup.timings["verify_s"]
    ("judge_queue_wait_s", "float64"),  # ScoredGroup.timings["queue_wait_s"]
    ("judge_latency_s", "float64"),  # scored created_at - rollout created_at: handed to the judges -> scored
    ("generate_s", "float64"),  # RolloutGroup.timings["generate_s"]
    ("rollout_created_at", "float64"),  # unix seconds
    ("scored_created_at", "float64"),
)


def arrow_schema():
    import pyarrow as pa

    types = {"int32": pa.int32(), "float32": pa.float32(), "float64": pa.float64(), "string": pa.string(),
             "list<int32>": pa.list_(pa.int32()), "list<float32>": pa.list_(pa.float32())}  # fmt: skip
    return pa.schema([(name, types[kind]) for name, kind in COLUMNS])


def group_columns(
    group: ScoredGroup, step: int, learner_version: int, reason: str | None, index: int, grpo: GRPOConfig,
    keep_text: bool,
) -> dict[str, list[Any]]:  # fmt: skip
    """The rows of one group, as columns (each a list of n_samples values)."""
    import torch

    from learner.advantages import group_advantages
    from learner.batch import shaped_rewards

    rollout, n = group.rollout, len(group.rollout.samples)
    shaped = torch.from_numpy(shaped_rewards(group, grpo))  # [N]
    adv = group_advantages(shaped, leave_one_out=grpo.use_leave_one_out_baseline, normalize=grpo.normalize_rewards)
    same = {
        "step": step, "dropped_reason": reason, "group_index": index, "group_id": group.group_id,
        "prompt_id": rollout.prompt.prompt_id, "batch_id": rollout.batch_id, "policy_version": rollout.policy_version,
        "staleness": learner_version - rollout.policy_version, "worker_id": rollout.worker_id,
        "judge_id": group.judge_id, "temperature": rollout.temperature,
        "prompt_ids": rollout.prompt.token_ids.to_numpy(), "prompt_text": rollout.prompt.text if keep_text else None,
        "ground_truth": rollout.prompt.ground_truth, "judge_verify_s": group.timings.get("verify_s"),
        "judge_queue_wait_s": group.timings.get("queue_wait_s"),
        "judge_latency_s": group.created_at - rollout.created_at, "generate_s": rollout.timings.get("generate_s"),
        "rollout_created_at": rollout.created_at, "scored_created_at": group.created_at,
    }  # fmt: skip
    cols: dict[str, list[Any]] = {name: [value] * n for name, value in same.items()}
    samples = rollout.samples
    cols["sample_index"] = list(range(n))
    cols["completion_ids"] = [s.token_ids.to_numpy() for s in samples]
    cols["completion_text"] = [s.text if keep_text else None for s in samples]
    cols["finish_reason"] = [s.finish_reason for s in samples]
    cols["behaviour_logprobs"] = [s.logprobs.to_numpy() for s in samples]
    cols["reward"] = group.rewards.to_numpy().tolist()
    cols["advantage"] = adv.tolist()
    cols["verdict"] = list(group.verdicts)
    return cols


class RolloutLog:
    """Rank 0's rollout log: `trained` and `dropped` enqueue, a daemon thread writes (module docstring)."""

    def __init__(self, cfg: RolloutLogConfig, directory: Path, grpo: GRPOConfig) -> None:
        import pyarrow.parquet  # noqa: F401 - loaded at start-up: on the first write it took 0.3 s of a step's core

        self.cfg, self.directory, self.grpo = cfg, directory, grpo
        self._schema = arrow_schema()
        directory.mkdir(parents=True, exist_ok=True)
        parts = part_files(directory)
        self._seq = int(PART_RE.match(parts[-1].name).group(1)) + 1 if parts else 0  # type: ignore[union-attr]
        self._bytes = sum(p.stat().st_size for p in parts)
        self._queue: queue.Queue = queue.Queue(maxsize=cfg.queue_steps)
        self.rows_written = 0
        self.rows_lost = 0  # queue full, over max_mb, or a failed write
        self.writer_cpu_s = 0.0  # CPU time of the writer thread: what the log takes from rank 0's cores
        self._columns: dict[str, list[Any]] = {name: [] for name, _ in COLUMNS}
        self._buffered_steps: list[int] = []
        self._last_flush_step: int | None = None
        self._failed = False
        self._thread = threading.Thread(target=self._run, name="rlq-rollout-log", daemon=True)
        self._thread.start()

    # --- the training thread's side: never blocks ---------------------------------------------------------------

    def trained(self, version: int, groups: Sequence[ScoredGroup]) -> dict[str, float]:
        """The groups the update to `version` trained on (in batch order); returns the log's counters."""
        self._put((version, version - 1, None, list(groups)))
        return self.metrics()

    def dropped(self, group: ScoredGroup, reason: str, learner_version: int) -> None:
        """A group the collector dropped while filling the step after `learner_version` (rollout_io.Collector)."""
        self._put((learner_version + 1, learner_version, reason, [group]))

    def metrics(self) -> dict[str, float]:
        return {"rollout/log_rows_written": float(self.rows_written), "rollout/log_rows_lost": float(self.rows_lost),
                "perf/rollout_log_cpu_s": self.writer_cpu_s}  # fmt: skip

    def _put(self, item: tuple) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.rows_lost += sum(len(g.rollout.samples) for g in item[3])

    # --- lifecycle ------------------------------------------------------------------------------------------------

    def drain(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Wait until everything enqueued so far is written (tests, the bench, `close`)."""
        done = threading.Event()
        self._queue.put(done, timeout=timeout_s)
        done.wait(timeout_s)

    def close(self) -> None:
        try:
            self._queue.put(_STOP, timeout=CLOSE_TIMEOUT_S)
        except queue.Full:
            log.warning("rollout log: writer stuck; %d queued steps not written", self._queue.qsize())
            return
        self._thread.join(CLOSE_TIMEOUT_S)
        log.info("rollout log: %d rows written, %d lost, in %s", self.rows_written, self.rows_lost, self.directory)

    # --- the writer thread ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            started = time.thread_time()
            try:
                if item is _STOP or isinstance(item, threading.Event):
                    self._flush()
                else:
                    self._add(*item)
            except Exception:  # a bug in a row's conversion must not kill the thread and fill the queue
                log.exception("rollout log: could not convert a group; its rows are counted as lost")
                self.rows_lost += sum(len(g.rollout.samples) for g in item[3]) if isinstance(item, tuple) else 0
            self.writer_cpu_s += time.thread_time() - started
            if item is _STOP:
                return
            if isinstance(item, threading.Event):
                item.set()

    def _add(self, step: int, learner_version: int, reason: str | None, groups: list[ScoredGroup]) -> None:
        for index, group in enumerate(groups):
            cols = group_columns(group, step, learner_version, reason, index if reason is None else -1, self.grpo,
                                 self.cfg.keep_text)  # fmt: skip
            for name, values in cols.items():
                self._columns[name].extend(values)
        self._buffered_steps.append(step)
        if self._last_flush_step is None:
            self._last_flush_step = step - 1
        full = len(self._columns["step"]) >= self.cfg.max_rows_per_file
        if full or step - self._last_flush_step >= self.cfg.flush_steps:
            self._flush()

    def _flush(self) -> None:
        rows = len(self._columns["step"])
        if not rows:
            return
        steps, columns = self._buffered_steps, self._columns
        self._columns = {name: [] for name, _ in COLUMNS}
        self._buffered_steps = []
        self._last_flush_step = max(steps)
        if self._failed or self._bytes >= self.cfg.max_mb * 2**20:
            if not self._failed:
                log.warning("rollout log reached logger.rollout_log.max_mb=%g: further rows are counted, not written",
                            self.cfg.max_mb)  # fmt: skip
                self._failed = True
            self.rows_lost += rows
            return
        try:
            self._bytes += self._write(columns, min(steps), max(steps))
            self.rows_written += rows
        except Exception as exc:  # OSError (a full disk), or Arrow refusing a value: the run goes on without the log
            log.error("rollout log: writing to %s failed (%s); further rows are counted, not written",
                      self.directory, exc)  # fmt: skip
            self._failed = True
            self.rows_lost += rows

    def _write(self, columns: dict[str, list[Any]], first: int, last: int) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pydict(columns, schema=self._schema)
        name = f"part-{self._seq:05d}-steps-{first:06d}-{last:06d}.parquet"
        tmp = self.directory / f".{name}.tmp"  # dot-files are invisible to pyarrow's and pandas' directory reads
        pq.write_table(table, tmp, compression="zstd")
        tmp.rename(self.directory / name)
        self._seq += 1
        return (self.directory / name).stat().st_size


def open_rollout_log(run_dir: Path, cfg: RolloutLogConfig, grpo: GRPOConfig) -> RolloutLog | None:
    """The run's rollout log, or None when `logger.rollout_log.enabled` is off."""
    return RolloutLog(cfg, Path(run_dir) / ROLLOUT_DIR, grpo) if cfg.enabled else None


# --- reading --------------------------------------------------------------------------------------------------------


def part_files(directory: Path) -> list[Path]:
    """The log's parts in write order (`directory` is `<run_dir>/rollouts`)."""
    if not directory.is_dir():
        return []
    seqs = {p: PART_RE.match(p.name) for p in directory.glob("part-*.parquet")}
    return sorted((p for p, m in seqs.items() if m), key=lambda p: int(seqs[p].group(1)))  # type: ignore[union-attr]


def read_log(run_dir: Path, *, step: int | None = None, columns: list[str] | None = None):
    """The run's rollout log as one pyarrow Table (`.to_pandas()` for a DataFrame); `step`: that step's rows only.

    Raises:
        UserError: the run directory has no rollout log.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from broker.errors import UserError

    parts = part_files(Path(run_dir) / ROLLOUT_DIR)
    if not parts:
        raise UserError(f"{Path(run_dir) / ROLLOUT_DIR} holds no rollout log (logger.rollout_log.enabled?)")
    filters = [("step", "=", step)] if step is not None else None
    tables = [pq.read_table(p, columns=columns, filters=filters) for p in parts]
    return pa.concat_tables(tables)


def rows_to_arrays(values: Sequence[Any], dtype: str) -> list[np.ndarray]:
    """A list column read back (lists or numpy arrays) as numpy arrays of `dtype`."""
    return [np.asarray(v, dtype=dtype) for v in values]
