"""Sending side of the weight sync: the learner's rank 0 -> every admitted generation worker.

Two transports behind one base, `WeightBroadcast.broadcast(model, version)`:

- `CollectiveBroadcast`: a weight group of its own (gloo on CPU, NCCL on GPU) built on a TCPStore that this
  process hosts, separate from the learner's torchrun group. Rank 0 is the learner, rank i+1 is
  `announcement.members[i]`. Parameters travel as flat buckets of at most `bucket_bytes` (one dtype per
  bucket), one broadcast each. With `flatten=True` (the learner's setting) the model's parameters are laid out
  as views of those buckets once (`weightsync.flat`), so later broadcasts send the parameter storage itself:
  no pack copy, no fresh memory to fault in. The `WeightAnnouncement` (version, epoch, bucket layout,
  rendezvous) is written to the policy hash before the first byte moves, so every member knows what to expect
  and a hang is visible.
- `FilesystemBroadcast` (learner/weight_transport.py, with the base class and the bucket plan): one safetensors
  file per version in a shared directory, announced the same way.

Membership (docs/weight_sync.md): a worker asks to join by writing `join:<worker_id>` into the policy hash. At
its next broadcast the learner admits live requesters and forms the group again under `epoch + 1`. A member
that misses the rendezvous, dies or stalls past `timeout_s` is evicted, the group is formed again without it
and the broadcast is retried, so the run goes on; an evicted worker that is still alive asks to join again.

Nothing here imports `workers/` or vLLM: the contract is `broker.schemas.WeightAnnouncement`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
import torch
import torch.distributed as dist

from broker.errors import WeightSyncError
from broker.keys import WEIGHT_JOINED_KEY, WEIGHT_TOKEN_ENV, Keys, weight_store_prefix
from broker.policy import checkpoint_model_dir
from broker.schemas import BucketSpec, JoinRequest, MessageError, WeightAnnouncement, decode
from learner.weight_transport import (
    BroadcastReport,
    FilesystemBroadcast,
    NamedTensors,
    WeightBroadcast,
    named_tensors,
    plan_buckets,
    total_bytes,
)
from weightsync.flat import bucket_view, flatten_into_buckets, pack_bucket, wait_in_order
from weightsync.groups import new_group
from weightsync.shared import SharedBuffers, device_id, node_name

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 64 * 1024 * 1024
DEFAULT_TIMEOUT_S = 60.0
MAX_ATTEMPTS = 3
"""Broadcast tries per version: a failure evicts the culprits and re-forms the group (epoch + 1)."""
DEAD_PEER_WAIT_S = 15.0
"""After a failure nobody can be blamed for yet (a member died after joining: its heartbeat key outlives it by up
to its TTL), wait this long at most for a heartbeat to lapse before re-forming. Without it the next try waits
the whole rendezvous timeout for the dead member (tests/faults measured 60 s instead of ~10)."""


class CollectiveBroadcast(WeightBroadcast):
    """gloo/NCCL broadcast from the learner (rank 0) to the admitted workers, with a watchdog and eviction."""

    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        *,
        master_addr: str | None = None,
        master_port: int = 0,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        backend: str | None = None,
        flatten: bool = False,
        share: str = "off",
        token: str | None = None,
    ) -> None:
        super().__init__(r, keys)
        # Which requesters read shared buffers instead of joining the group (weight_sync.transport.share_memory).
        self.share = share
        self.shared: SharedBuffers | None = None
        self.shared_members: list[str] = []
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.backend = backend
        # Off by default: it changes the storage (not the identity) of the caller's parameters. The learner turns
        # it on (make_broadcast); bench/gpu_weight_sync.py measures both layouts with the default.
        self.flatten = flatten
        self._plan: tuple[tuple, list[BucketSpec]] | None = None
        self._ring: dict[str, list[torch.Tensor]] = {}  # per dtype: 2 reusable pack buffers (CPU packed path)
        self.master_addr = master_addr or socket.gethostname()
        self.token = token
        # The store listens on `master_addr` when the run names one (TCPStore binds every interface itself, so
        # the socket is ours); port 0: the OS picks a free one, the announcement tells the workers which.
        listen_fd, port = listen_socket(master_addr, master_port)
        self.store = dist.TCPStore(
            master_addr or "0.0.0.0", port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False,
            master_listen_fd=listen_fd,
        )  # fmt: skip
        self.master_port = self.store.port
        self.epoch = self._last_epoch()
        self.members: list[str] = []
        self.pg: Any = None
        log.info("weight group store on %s:%d (epoch %d)", self.master_addr, self.master_port, self.epoch)

    def broadcast(self, source: torch.nn.Module | Iterable[tuple[str, torch.Tensor]], version: int) -> BroadcastReport:
        """Send every parameter to every member; evicts failing members and retries, never hangs.

        Raises:
            WeightSyncError: MAX_ATTEMPTS tries failed (the learner may go on; workers keep older weights).
        """
        tensors = named_tensors(source)
        buckets = self._buckets(tensors)
        if self.flatten and isinstance(source, torch.nn.Module) and self._flatten(source, tensors, buckets):
            tensors = named_tensors(source)  # the same parameters, now views of the buckets
        by_name = dict(tensors)
        device = tensors[0][1].device
        backend = self.backend or ("nccl" if device.type == "cuda" else "gloo")
        report = BroadcastReport(version=version, epoch=self.epoch, members=[], bytes=total_bytes(buckets))
        t0 = time.perf_counter()
        shared_written = False
        for attempt in range(1, MAX_ATTEMPTS + 1):
            report.attempts = attempt
            reform = self._update_membership(device)
            report.epoch, report.members = self.epoch, list(self.members) + list(self.shared_members)
            if self.shared_members and not shared_written:
                self._write_shared(by_name, buckets, device)
                shared_written = True
            self._announce(self._announcement(version, backend, buckets))
            if not self.members:
                break
            try:
                if reform or self.pg is None:
                    self.pg = self._form_group(backend)
                self._send(buckets, by_name, device)
                break
            except (RuntimeError, dist.DistError) as exc:
                culprits = self._culprits() or self._wait_for_lapsed_heartbeat(min(DEAD_PEER_WAIT_S, self.timeout_s))
                log.warning("weight broadcast v%d epoch %d failed (%s); evicting %s", version, self.epoch,
                            str(exc).splitlines()[0][:200], culprits or "nobody identified")  # fmt: skip
                report.evicted += culprits
                self.members = [m for m in self.members if m not in culprits]
                self.pg = None  # the next try (or the next version) forms a fresh group under epoch + 1
        else:
            raise WeightSyncError(f"weight broadcast v{version} failed {MAX_ATTEMPTS} times; evicted {report.evicted}")
        report.seconds = time.perf_counter() - t0
        log.info("weights v%d -> %d workers + %d through shared buffers in %.3fs (epoch %d, %d buckets, %.1f MB)",
                 version, len(self.members), len(self.shared_members), report.seconds, self.epoch, len(buckets),
                 report.bytes / 1e6)  # fmt: skip
        return report

    def close(self) -> None:
        self.pg = None
        self.policy.withdraw()
        if self.shared is not None:
            self.shared.close()

    def _write_shared(self, by_name: dict[str, torch.Tensor], buckets: list[BucketSpec], device: torch.device) -> None:
        """Rewrite the shared buffers under the seqlock: odd while writing, even (in the announcement) after."""
        if self.shared is None:
            self.shared = SharedBuffers(device, f"{self.keys.run}-{os.getpid()}")
        self.policy.begin_shared_write(self.shared.seq + 1)
        self.shared.write(by_name, buckets)
        self.shared.seq += 2

    def _buckets(self, tensors: NamedTensors) -> list[BucketSpec]:
        """The bucket plan, kept while names, shapes and dtypes stay the same (a plan costs Python per tensor)."""
        key = tuple((n, tuple(t.shape), t.dtype) for n, t in tensors)
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, plan_buckets(tensors, self.bucket_bytes))
        return self._plan[1]

    @staticmethod
    def _flatten(model: torch.nn.Module, tensors: NamedTensors, buckets: list[BucketSpec]) -> bool:
        """Lay `model`'s parameters out as the buckets (once; again only if something moved them). True if done.

        Plain tensors only: sharded (DTensor) parameters have no local storage to lay out.
        """
        by_name = dict(tensors)
        if all(bucket_view(by_name, spec) is not None for spec in buckets):
            return False
        if any(type(t) is not torch.Tensor for _, t in tensors):
            return False
        flatten_into_buckets(model, buckets)
        return True

    def _pack_buffer(self, spec: BucketSpec, device: torch.device, slot: int) -> torch.Tensor | None:
        """A reusable [spec.numel] pack buffer on CPU, where a fresh one costs page faults on every byte (a 517 MB
        model: ~0.2 s of first touch, more than the transfer); None on GPU, whose caching allocator reuses memory."""
        if device.type != "cpu":
            return None
        ring = self._ring.setdefault(spec.dtype, [])
        while len(ring) <= slot:
            ring.append(torch.empty(0, dtype=getattr(torch, spec.dtype)))
        if ring[slot].numel() < spec.numel:
            ring[slot] = torch.empty(spec.numel, dtype=getattr(torch, spec.dtype))
        return ring[slot][: spec.numel]

    def _last_epoch(self) -> int:
        """Continue after the epoch of any earlier announcement, so a restarted learner never reuses one."""
        ann = self.policy.announcement()
        return ann.epoch + 1 if ann is not None else 0

    def _update_membership(self, device: torch.device | None = None) -> bool:
        """Admit live join requests, drop dead members; True when the group must be formed again.

        A requester on this process's own device (weight_sync.transport.share_memory) reads the shared buffers instead:
        it never enters the group, so admitting or losing one re-forms nothing."""
        joins = self.policy.take_join_requests()
        requests = sorted(joins)
        sharing = {w for w in requests if device is not None and self._shares_device(joins[w], device)}
        alive = self._alive(set(self.members) | set(self.shared_members) | set(requests))
        self.shared_members = sorted((set(self.shared_members) | sharing) & alive)
        requests = [w for w in requests if w not in sharing]
        members = [m for m in self.members if m not in sharing]
        wanted = [m for m in members if m in alive] + [w for w in requests if w in alive and w not in members]
        if wanted == self.members and (self.pg is not None or not wanted):
            return False
        self.epoch += 1  # any change of membership, or a group lost to a failure, is a new epoch
        self.members = wanted
        self.pg = None
        return True

    def _shares_device(self, raw: Any, device: torch.device) -> bool:
        """Whether a join request comes from a worker on this process's device and may read shared buffers."""
        if self.share == "off":
            return False
        try:
            request = decode(raw, JoinRequest)
        except MessageError:
            return False  # an older worker's request (a timestamp): it joins the group
        assert isinstance(request, JoinRequest)
        if request.node != node_name() or request.device != device_id(device):
            return False
        return request.device != "cpu" or self.share == "host"

    def _alive(self, worker_ids: set[str]) -> set[str]:
        ids = sorted(worker_ids)
        pipe = self.r.pipeline(transaction=False)
        for w in ids:
            pipe.exists(self.keys.worker_alive(w))
        return {w for w, ok in zip(ids, pipe.execute(), strict=True) if ok}

    def _announcement(self, version: int, backend: str, buckets: list[BucketSpec]) -> WeightAnnouncement:
        return WeightAnnouncement(
            version=version, epoch=self.epoch, backend=backend, master_addr=self.master_addr,
            master_port=self.master_port, world_size=len(self.members) + 1, members=list(self.members),
            buckets=buckets, checkpoint_path=self._checkpoint_dir(), timeout_s=self.timeout_s,
            shared=self.shared.describe() if self.shared is not None and self.shared_members else None,
            shared_members=list(self.shared_members),
        )  # fmt: skip

    def _checkpoint_dir(self) -> str:
        """The model directory of the learner's latest checkpoint, which a joining worker loads first, or ''."""
        path = self.policy.checkpoint()
        return checkpoint_model_dir(path) if path else ""

    def _epoch_store(self) -> dist.PrefixStore:
        return dist.PrefixStore(weight_store_prefix(self.epoch, self.token), self.store)

    def _form_group(self, backend: str) -> Any:
        """Rendezvous of this epoch; raises if a member does not arrive within `timeout_s`."""
        return new_group(backend, self._epoch_store(), 0, len(self.members) + 1, self.timeout_s)

    def _send(self, buckets: list[BucketSpec], by_name: dict[str, torch.Tensor], device: torch.device) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        deadline = time.monotonic() + self.timeout_s
        in_flight: list = []  # NCCL, and gloo buckets sent from the parameters themselves: waited for at the end
        packed_works: list = []  # gloo buckets sent from a pack buffer: at most 2 alive (the buffers rotate)
        n_packed = 0
        for spec in buckets:
            # Parameters laid out as this bucket (weightsync.flat) are sent as they are: no copy, no memory.
            flat = bucket_view(by_name, spec)  # [numel]
            packed = flat is None
            if packed and device.type == "cpu" and len(packed_works) >= 2:
                packed_works.pop(0).wait(timedelta(seconds=_left(deadline, self.timeout_s)))  # frees its buffer
            if packed:
                flat = pack_bucket(by_name, spec, device, self._pack_buffer(spec, device, n_packed % 2))
                n_packed += 1
            work = self.pg.broadcast([flat], opts)
            if device.type == "cpu":
                (packed_works if packed else in_flight).append(work)
            elif packed:
                work.wait(timedelta(seconds=_left(deadline, self.timeout_s)))  # one packed bucket alive at a time
            else:
                in_flight.append(work)  # NCCL runs them in order on its stream; no host round trip per bucket
        if device.type == "cpu":
            # gloo: every bucket is in flight at once (its worker threads keep the order); wait in issue order.
            for work in in_flight + packed_works:
                work.wait(timedelta(seconds=_left(deadline, self.timeout_s)))
        else:
            wait_in_order(in_flight, deadline)
            torch.cuda.synchronize(device)

    def _wait_for_lapsed_heartbeat(self, wait_s: float) -> list[str]:
        """Members whose heartbeat key expires within `wait_s` (polled), else none."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            alive = self._alive(set(self.members))
            gone = [m for m in self.members if m not in alive]
            if gone:
                return gone
            time.sleep(0.5)
        return []

    def _culprits(self) -> list[str]:
        """Members that never reached this epoch's rendezvous, else those whose heartbeat has stopped."""
        store = self._epoch_store()
        missing = []
        for m in self.members:
            try:
                if not store.check([WEIGHT_JOINED_KEY + m]):
                    missing.append(m)
            except (RuntimeError, dist.DistError):
                missing.append(m)
        if missing:
            return missing
        alive = self._alive(set(self.members))
        return [m for m in self.members if m not in alive]


def listen_socket(addr: str | None, port: int) -> tuple[int, int]:
    """(fd, port) of a listening TCP socket on `addr` (every interface when None) for the weight group's store;
    the store owns the descriptor from then on (detached: Python never closes it under the store).

    Raises:
        WeightSyncError: `addr` is not an address of this host, or the port is taken (one line).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr or "0.0.0.0", port))
        sock.listen(512)
    except OSError as exc:
        sock.close()
        raise WeightSyncError(
            f"the weight group's store cannot listen on {addr or '0.0.0.0'}:{port} ({exc.strerror or exc}): set "
            "weight_sync.transport.addr to an address of the learner's host"
        ) from None
    port = sock.getsockname()[1]
    return sock.detach(), port


def _left(deadline: float, timeout_s: float) -> float:
    """Seconds left before `deadline` (time.monotonic()); raises once it has passed."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise RuntimeError(f"weight broadcast exceeded its {timeout_s:.0f}s deadline")
    return remaining


def make_broadcast(cfg: Any, r: redis.Redis) -> WeightBroadcast:
    """The transport a LearnerConfig's `learner.weight_sync.transport` names (collective | filesystem)."""
    rt = cfg.learner
    keys = Keys(rt.run)
    transport = rt.weight_sync.transport
    if transport.kind == "filesystem":
        return FilesystemBroadcast(r, keys, Path(transport.directory or Path(rt.run_dir) / "weights"))
    if transport.kind != "collective":
        raise ValueError(f"weight_sync.transport.kind={transport.kind!r} sends no weights")
    return CollectiveBroadcast(
        r,
        keys,
        master_addr=transport.addr,
        master_port=transport.port,
        bucket_bytes=int(transport.bucket_mb * 2**20),
        timeout_s=transport.timeout_s,
        backend=None if transport.backend == "auto" else transport.backend,
        flatten=True,  # the learner's parameters become views of the buckets at the first broadcast
        share=transport.share_memory,
        token=os.environ.get(WEIGHT_TOKEN_ENV) or None,
    )
