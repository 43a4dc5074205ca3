"""Receiving side of the weight sync, and the vLLM worker extension that loads what arrives.

`WeightReceiver` joins the weight group an announcement names (its own TCPStore client + gloo/NCCL group, never
torch.distributed's global state), receives one flat tensor per bucket and cuts it into named parameters by the
announced layout. Everything is received before anything is loaded: a broadcast that stalls or loses its
learner raises `WeightSyncError` within `announcement.timeout_s` and leaves the model untouched, and the worker
asks to join again at the next epoch (docs/weight_sync.md).

`VllmWeightExtension` is mixed into vLLM's worker (`LLM(worker_extension_cls=...)`) and driven through
`llm.collective_rpc`: it receives in the engine's worker process, where the weights live, and loads through
`model_runner.reload_weights`, vLLM's in-place reload. On the CPU build the plain `model.load_weights` fails
half-way because linear weights are prepacked into oneDNN handles (the parameters are left with shape [0]).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from broker.errors import EngineStateLost as EngineStateLost  # re-exported: defined once, in broker.errors
from broker.errors import WeightSyncError
from broker.keys import WEIGHT_JOINED_KEY, WEIGHT_TOKEN_ENV, weight_store_prefix
from broker.schemas import BucketSpec, WeightAnnouncement, decode
from weightsync.flat import bucket_view, wait_in_order
from weightsync.groups import new_group

log = logging.getLogger(__name__)

NamedTensors = list[tuple[str, torch.Tensor]]


def unpack_bucket(flat: torch.Tensor, spec: BucketSpec) -> NamedTensors:
    """Views into `flat` [spec.numel], one per parameter of the bucket, in the announced shapes."""
    if flat.numel() != spec.numel:
        raise WeightSyncError(f"bucket holds {flat.numel()} elements, the layout says {spec.numel}")
    out = []
    for ts in spec.tensors:
        if ts.offset < 0 or ts.offset + ts.numel > spec.numel or ts.numel != _prod(ts.shape):
            raise WeightSyncError(f"tensor {ts.name} does not fit its bucket: {ts}")
        out.append((ts.name, flat[ts.offset : ts.offset + ts.numel].view(ts.shape)))
    return out


def _prod(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class WeightReceiver:
    """One worker's membership of the weight group: joins per epoch, receives buckets, never hangs."""

    def __init__(self, worker_id: str, device: torch.device | str = "cpu", *, reuse_buffers: bool = False) -> None:
        """`reuse_buffers`: receive every update into the same buffers (CPU: a fresh buffer costs a page fault per
        4 KiB, ~0.2 s for 517 MB, more than the transfer). The tensors `receive` returns are then valid only
        until the next `receive`, and one copy of the weights stays allocated between updates."""
        self.worker_id = worker_id
        self.device = torch.device(device)
        self.epoch: int | None = None
        # The store and epoch of the group joined: the same epoch number under another learner's store (a test's
        # second learner, a learner moved to another port) is another group.
        self._group: tuple[str, int, int] | None = None
        self.pg: Any = None
        self._store: Any = None
        self.reuse_buffers = reuse_buffers
        self._buffers: list[torch.Tensor] = []
        # The run's token (the launcher or the Slurm script hands it over): without the learner's, this worker
        # rendezvouses where no member is, and the learner evicts it after the rendezvous timeout.
        self._token = os.environ.get(WEIGHT_TOKEN_ENV) or None

    def receive(
        self,
        ann: WeightAnnouncement,
        into: dict[str, torch.Tensor] | None = None,
        on_bucket: Callable[[NamedTensors], None] | None = None,
    ) -> NamedTensors:
        """Every parameter of `ann`, received from rank 0 of the weight group.

        `into` (parameters by name, laid out by `weightsync.flat.flatten_into_buckets`): buckets that are views
        of these parameters are received in place and left out of the result. Faster and copy-free, but a
        failure then leaves the model partly updated: the caller must restore it (engine_hf_fast reloads the
        checkpoint).

        `on_bucket` is called with each bucket's tensors, in order, as soon as that bucket has arrived (on CPU;
        on GPU once all have), while later buckets are still in flight. An exception it raises fails the
        receive like a transfer error.

        Raises:
            WeightSyncError: not a member, the rendezvous or a bucket did not complete within `ann.timeout_s`,
                or the learner died; the group is left and must be joined again under a later epoch.
        """
        if self.worker_id not in ann.members:
            raise WeightSyncError(f"{self.worker_id} is not a member of weight-group epoch {ann.epoch}")
        try:
            if self.pg is None or self._group != (ann.master_addr, ann.master_port, ann.epoch):
                self._join(ann)
            return self._receive_buckets(ann, into or {}, on_bucket)
        except (RuntimeError, dist.DistError, ValueError) as exc:
            self.leave()
            if isinstance(exc, WeightSyncError):
                raise
            first = str(exc).splitlines()[0][:240] if str(exc) else type(exc).__name__
            raise WeightSyncError(f"weight update v{ann.version} epoch {ann.epoch} failed: {first}") from None

    def leave(self) -> None:
        self.pg = None
        self._store = None
        self.epoch = None
        self._group = None

    def _join(self, ann: WeightAnnouncement) -> None:
        self.leave()
        rank = ann.members.index(self.worker_id) + 1
        timeout = timedelta(seconds=ann.timeout_s)
        self._store = dist.TCPStore(ann.master_addr, ann.master_port, None, False, timeout)
        store = dist.PrefixStore(weight_store_prefix(ann.epoch, self._token), self._store)
        store.set(WEIGHT_JOINED_KEY + self.worker_id, "1")
        self.pg = new_group(ann.backend, store, rank, ann.world_size, ann.timeout_s)
        self.epoch = ann.epoch
        self._group = (ann.master_addr, ann.master_port, ann.epoch)
        log.info("joined weight group epoch %d as rank %d of %d", ann.epoch, rank, ann.world_size)

    def _receive_buckets(
        self, ann: WeightAnnouncement, into: dict[str, torch.Tensor], on_bucket: Callable[[NamedTensors], None] | None
    ) -> NamedTensors:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        deadline = time.monotonic() + ann.timeout_s
        per_bucket: list[NamedTensors] = []
        in_flight: list = []
        gloo_works: list = []
        for i, spec in enumerate(ann.buckets):
            flat = bucket_view(into, spec) if into else None  # [numel], the parameters themselves
            in_place = flat is not None
            if flat is None:
                flat = self._buffer(i, spec)  # [numel]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WeightSyncError(f"weight update v{ann.version} exceeded its {ann.timeout_s:.0f}s deadline")
            work = self.pg.broadcast([flat], opts)
            # NCCL keeps them in order; gloo too (tags follow the issue order), and every bucket is kept anyway:
            # posting them all lets the next transfer start while Python is still cutting up this one.
            (in_flight if self.device.type == "cuda" else gloo_works).append(work)
            per_bucket.append([] if in_place else unpack_bucket(flat, spec))  # views: filled in as it completes
        del self._buffers[len(ann.buckets) :]  # a layout with fewer buckets: free the rest
        for work, tensors in zip(gloo_works, per_bucket, strict=False):
            work.wait(timedelta(seconds=max(deadline - time.monotonic(), 1e-3)))
            if on_bucket is not None:
                _call(on_bucket, tensors)  # overlaps the buckets still arriving
        wait_in_order(in_flight, deadline)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            for tensors in per_bucket if on_bucket is not None else []:
                _call(on_bucket, tensors)
        return [item for tensors in per_bucket for item in tensors]

    def _buffer(self, index: int, spec: BucketSpec) -> torch.Tensor:
        """A [spec.numel] tensor to receive bucket `index` into: kept from the last update when reuse is on."""
        dtype = getattr(torch, spec.dtype)
        if not self.reuse_buffers:
            return torch.empty(spec.numel, dtype=dtype, device=self.device)
        while len(self._buffers) <= index:
            self._buffers.append(torch.empty(0, dtype=dtype, device=self.device))
        if self._buffers[index].dtype != dtype or self._buffers[index].numel() != spec.numel:
            self._buffers[index] = torch.empty(spec.numel, dtype=dtype, device=self.device)
        return self._buffers[index]


class SharedView:
    """The learner's shared buffers (weightsync/shared.py) opened in this process, kept while they stay the same."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._flats: list[torch.Tensor] = []

    def tensors(self, ann: WeightAnnouncement) -> NamedTensors:
        """Named views into the shared buffers, in the announced layout (no copy)."""
        from weightsync.shared import open_buckets

        if ann.shared is None:
            raise WeightSyncError(f"announcement v{ann.version} has no shared buffers")
        key = (ann.shared.node, ann.shared.device, tuple((b.path, b.handle) for b in ann.shared.buckets),
               tuple((b.dtype, b.numel) for b in ann.buckets))  # fmt: skip
        if key != self._key:
            self._flats, self._key = [], None  # the learner's old buffers are released before mapping new ones
            try:
                self._flats = open_buckets(ann.shared, ann.buckets)
            except (RuntimeError, OSError) as exc:
                raise WeightSyncError(f"cannot open the shared weights of v{ann.version}: {exc}") from None
            self._key = key
        return [item for flat, spec in zip(self._flats, ann.buckets, strict=True) for item in unpack_bucket(flat, spec)]


def _call(on_bucket: Callable[[NamedTensors], None], tensors: NamedTensors) -> None:
    """A failing callback fails the receive like a transfer error: the group is left, the update reported."""
    try:
        on_bucket(tensors)
    except Exception as exc:
        raise RuntimeError(f"loading a received bucket failed: {type(exc).__name__}: {exc}") from exc


def load_safetensors(path: str) -> NamedTensors:
    """Parameters of one safetensors file, or of every `*.safetensors` in a directory."""
    from pathlib import Path

    from safetensors.torch import load_file

    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files:
        raise WeightSyncError(f"no safetensors weights in {path}")
    return [item for f in files for item in load_file(str(f)).items()]


def refresh_tied_cpu_gemms(model: torch.nn.Module) -> int:
    """Re-pack CPU GEMM handles of layers that keep their weight but were not reloaded themselves.

    vLLM's CPU build packs each linear weight into a oneDNN handle at load time. An lm_head tied to the
    embedding is never passed to its own loader during a reload, so its handle would keep the old weights
    (measured: logprobs off by ~20 nats after an update). Re-running the layer's post-load processing packs
    the current, shared tensor again. Layers whose weight was dropped after packing (shape [0]) were reloaded.
    """
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        method = getattr(module, "quant_method", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.numel() > 0 and method:
            method.process_weights_after_loading(module)
            count += 1
    return count


class VllmWeightExtension:
    """Methods vLLM mixes into its worker; called as `llm.collective_rpc("rlq_update_weights", ...)`."""

    model_runner: Any
    device: Any

    def rlq_update_weights(self, announcement: bytes, worker_id: str) -> dict[str, float]:
        """Receive the broadcast `announcement` describes and load it in place; returns timings (seconds)."""
        ann = decode(announcement, WeightAnnouncement)
        assert isinstance(ann, WeightAnnouncement)
        receiver = self._rlq_receiver(worker_id)
        t0 = time.perf_counter()
        load = self._rlq_begin_in_place()  # CPU: loads and re-packs each bucket as it arrives
        try:
            with self._rlq_config():
                tensors = receiver.receive(ann, on_bucket=load.add if load is not None else None)
        except BaseException:
            if load is not None:
                load.rollback()  # the engine computes with its previous weights again
            raise
        t1 = time.perf_counter()
        if load is not None:
            self._rlq_finish(load)
        else:
            self._rlq_load(tensors)
        # receive_s includes the loading and re-packing that overlapped the transfer; load_s is what came after.
        return {"version": float(ann.version), "receive_s": t1 - t0, "load_s": time.perf_counter() - t1,
                "in_place": float(load is not None)}  # fmt: skip

    def rlq_load_file(self, path: str) -> dict[str, float]:
        """Load a safetensors file or directory in place (filesystem sync, or a joining worker's checkpoint)."""
        t0 = time.perf_counter()
        self._rlq_load(load_safetensors(path))
        return {"load_s": time.perf_counter() - t0}

    def rlq_load_shared(self, announcement: bytes) -> dict[str, float]:
        """Load the learner's shared buffers in place (a worker on the learner's device: no group, no copy in)."""
        ann = decode(announcement, WeightAnnouncement)
        assert isinstance(ann, WeightAnnouncement)
        t0 = time.perf_counter()
        view = getattr(self, "_rlq_shared_view", None)
        if view is None:
            view = self._rlq_shared_view = SharedView()
        tensors = view.tensors(ann)
        t1 = time.perf_counter()
        self._rlq_load(tensors)
        if torch.cuda.is_available() and isinstance(getattr(self, "device", None), torch.device):
            torch.cuda.synchronize(self.device)  # the seqlock check that follows must see every read done
        return {"open_s": t1 - t0, "load_s": time.perf_counter() - t1}

    def rlq_device_id(self) -> str:
        from weightsync.shared import device_id

        device = getattr(self, "device", None)
        return device_id(device) if isinstance(device, torch.device) else "cpu"

    def rlq_leave_group(self) -> None:
        receiver = getattr(self, "_rlq_weight_receiver", None)
        if receiver is not None:
            receiver.leave()

    def rlq_mark_torch_gemms(self) -> int:
        """After a load under `vllm_reload.torch_cpu_gemms`: the layers whose weights updates copy into."""
        from workers.generate.vllm_reload import mark_torch_gemms

        return mark_torch_gemms(self.model_runner.get_model())

    def rlq_named_parameters(self) -> list[tuple[str, list[int], str]]:
        """(name, shape, dtype) of the engine's parameters, for checks and the docs."""
        model = self.model_runner.get_model()
        return [(n, list(p.shape), str(p.dtype)) for n, p in model.named_parameters()]

    def _rlq_receiver(self, worker_id: str) -> WeightReceiver:
        receiver = getattr(self, "_rlq_weight_receiver", None)
        if receiver is None or receiver.worker_id != worker_id:
            device = self.device if isinstance(getattr(self, "device", None), torch.device) else "cpu"
            # The buffers are only read by the load that follows each receive; on CPU reusing them saves faulting
            # in a full copy of the weights every update.
            receiver = WeightReceiver(worker_id, device, reuse_buffers=torch.device(device).type == "cpu")
            self._rlq_weight_receiver = receiver
        return receiver

    def _rlq_load(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> bool:
        """Load Hugging Face-named tensors; True if the CPU in-place path did it, False if vLLM's reload did."""
        # Names are Hugging Face's; both paths map them (q/k/v -> qkv_proj, ...) with the model's load_weights.
        load = self._rlq_begin_in_place()
        if load is not None:
            try:
                with self._rlq_config():
                    load.add(tensors)
            except BaseException:
                load.rollback()
                raise
            self._rlq_finish(load)
            return True
        model = self.model_runner.get_model()
        quantized = self.model_runner.vllm_config.model_config.quantization is not None
        if next(model.parameters()).device.type == "cuda" and not quantized:
            # A dense GPU model keeps every weight as loaded: its own load_weights copies into the live parameters
            # (names mapped, q/k/v fused), which CUDA graphs and compiled code keep reading. 8 GB in ~0.02 s on an
            # H200, against 0.1-0.35 s for reload_weights, which rebuilds every layer (vllm-kit's probe).
            with self._rlq_config():
                model.load_weights(tensors)
            return True
        # Elsewhere (quantized): vLLM's layer-wise reload. The worker's own reload_weights sets vLLM's
        # current config around the model runner's.
        reload = getattr(self, "reload_weights", None) or self.model_runner.reload_weights
        reload(weights_iterator=iter(tensors), is_checkpoint_format=True)
        if next(model.parameters()).device.type == "cpu":
            refresh_tied_cpu_gemms(model)
        return False

    def _rlq_begin_in_place(self) -> Any:
        """A `workers.generate.vllm_reload.InPlaceLoad` for this update, or None where vLLM's reload must do it."""
        from workers.generate.vllm_reload import InPlaceLoad

        quantized = self.model_runner.vllm_config.model_config.quantization is not None
        with self._rlq_config():
            return InPlaceLoad.begin(self.model_runner.get_model(), quantized)

    def _rlq_finish(self, load: Any) -> None:
        from workers.generate.vllm_reload import ModelLeftMixed

        try:
            with self._rlq_config():
                load.finish()
        except ModelLeftMixed:
            raise  # nothing to roll back to: the worker must not keep sampling (workers/generate/engines.py)
        except BaseException:
            load.rollback()
            raise
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):  # as reload_weights does
            getattr(self.model_runner, reset, lambda: None)()

    def _rlq_config(self) -> Any:
        """vLLM's context that weight loaders and post-load processing read their settings from."""
        from vllm.config import set_current_vllm_config

        return set_current_vllm_config(self.model_runner.vllm_config)
