"""Every message that crosses a process boundary in rlq, and its msgpack codec.

Each message is a `msgspec.Struct` tagged by a `kind` field and serialised as plain msgpack (msgspec is the
codec; the bytes are ordinary msgpack maps that any msgpack reader can open). Arrays (token ids, logprobs,
rewards) travel as `Array`: packed little-endian bytes with a dtype and a shape, never as lists of Python
numbers. Decoding is strict: unknown fields, wrong types, unknown ext types, a wrong schema version,
inconsistent array sizes, truncated or oversize payloads all raise one error type, `MessageError`, so a
consumer can dead-letter the entry and keep going.

The weight-sync contract (parameter names, shapes, dtypes and bucket offsets) lives here too, because the
learner and the generation workers must agree on it without importing each other.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Literal

import msgspec
import numpy as np

from broker.errors import RlqError

SCHEMA_VERSION = 3
"""2: `purpose` on PromptBatch and RolloutGroup (in-run validation). 3: shared weight buffers in the
WeightAnnouncement (`shared`, `shared_members`) and the JoinRequest."""
"""Bumped whenever a field changes meaning; a consumer rejects messages of any other version."""

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Upper bound on one encoded message. A 16 x 1024-token group with logprobs is ~130 KB; a larger payload is
a bug or an attack, and is rejected before any allocation happens."""

DTYPES: dict[str, np.dtype] = {
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "uint8": np.dtype("u1"),
}

_ITEMSIZE = {name: dt.itemsize for name, dt in DTYPES.items()}
# Array validation runs ~33 times per decoded RolloutGroup; plain ints and one loop keep it off the profile.

Verdict = Literal["correct", "incorrect", "no_answer", "timeout", "error"]
VERDICTS: tuple[str, ...] = ("correct", "incorrect", "no_answer", "timeout", "error")
Purpose = Literal["train", "val"]


class MessageError(RlqError, ValueError):
    """A payload that is not a valid rlq message: the one error every consumer catches and dead-letters."""


def now() -> float:
    """Wall-clock timestamp factory (seconds since the epoch), evaluated per message, never at import."""
    return time.time()


def default_node() -> str:
    return socket.gethostname()


# gc=False on the message structs: a message is a tree (nothing in it refers back up), so the cyclic collector
# never needs to see it. A decoded RolloutGroup is ~70 structs; tracking them made the collector's passes about
# half of the decode time in bench/broker.py.
class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="kind", gc=False):
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema != SCHEMA_VERSION:
            raise ValueError(f"schema version {self.schema}, this build speaks {SCHEMA_VERSION}")


class Array(msgspec.Struct, forbid_unknown_fields=True, array_like=True, gc=False):
    """A packed n-d array: `data` holds prod(shape) items of `dtype`, little-endian, C order.

    `data` is a memoryview: a decoded Array points into the received payload instead of copying it (for a
    128 KB rollout group that copy was most of the decode time), and `to_numpy` views the same bytes.
    """

    dtype: str
    shape: list[int]
    data: memoryview

    def __post_init__(self) -> None:
        if not isinstance(self.data, memoryview) or self.data.format != "B":  # bytes, or a typed view from numpy
            self.data = memoryview(self.data).cast("B")
        expected = _ITEMSIZE.get(self.dtype)
        if expected is None:
            raise ValueError(f"unsupported array dtype {self.dtype!r}")
        for dim in self.shape:
            if dim < 0:
                raise ValueError(f"negative array dimension in {self.shape}")
            expected *= dim
        if expected != len(self.data):
            raise ValueError(f"array of shape {self.shape} {self.dtype} needs {expected} bytes, got {len(self.data)}")

    @classmethod
    def from_numpy(cls, values: np.ndarray | list, dtype: str) -> Array:
        arr = np.ascontiguousarray(np.asarray(values, dtype=DTYPES[dtype]))
        return cls(dtype=dtype, shape=list(arr.shape), data=memoryview(arr.tobytes()))

    def to_numpy(self) -> np.ndarray:
        """A read-only view on the payload (no copy)."""
        return np.frombuffer(self.data, dtype=DTYPES[self.dtype]).reshape(self.shape)

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 1

    def __reduce__(self) -> tuple[type, tuple[str, list[int], bytes]]:
        return (Array, (self.dtype, self.shape, self.data.tobytes()))  # memoryviews do not pickle; bytes do


class Prompt(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """One problem to sample: the tokenised chat prompt and what the judge needs to score it."""

    prompt_id: str  # stable id of the dataset row, e.g. "arith-train-000123"
    token_ids: Array  # int32 [prompt_len], chat template already applied
    ground_truth: str  # reference answer the verifier compares against
    verifier: str = "math"  # routing key: which judge queue scores it (NeMo Gym's agent_ref analogue)
    text: str = ""  # the rendered prompt, kept for inspection and the LLM-judge fallback


class PromptBatch(_Base, tag="prompt_batch"):
    """Feeder -> generation workers, on the prompts stream."""

    batch_id: str
    prompts: list[Prompt]
    n_samples: int  # completions to draw per prompt (the GRPO group size)
    min_policy_version: int = 0  # the worker must hold at least this version before sampling
    purpose: Purpose = "train"  # "val": scored for val/* metrics, never trained on
    created_at: float = msgspec.field(default_factory=now)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prompts:
            raise ValueError("prompt batch has no prompts")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")


class Sample(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """One sampled completion with the behaviour policy's per-token logprobs."""

    token_ids: Array  # int32 [completion_len]
    logprobs: Array  # float32 [completion_len], log pi_behaviour(token) at the sampling temperature
    finish_reason: str  # "stop" | "length" | "abort"
    text: str = ""

    def __post_init__(self) -> None:
        if self.token_ids.shape != self.logprobs.shape:
            raise ValueError(f"token_ids {self.token_ids.shape} and logprobs {self.logprobs.shape} differ in shape")


class RolloutGroup(_Base, tag="rollout_group"):
    """Generation worker -> judges: all samples drawn for one prompt by one policy version."""

    group_id: str  # "<prompt_id>@<batch_id>": idempotency key end to end
    batch_id: str
    prompt: Prompt
    samples: list[Sample]
    policy_version: int  # learner version whose weights produced every sample of the group
    worker_id: str
    temperature: float = 1.0  # the sampling temperature: the learner scores the samples at it too
    purpose: Purpose = "train"  # copied from the PromptBatch
    timings: dict[str, float] = msgspec.field(default_factory=dict)  # seconds: queue_wait_s, generate_s, ...
    created_at: float = msgspec.field(default_factory=now)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.samples:
            raise ValueError("rollout group has no samples")
        if self.policy_version < 0:
            raise ValueError(f"policy_version must be >= 0, got {self.policy_version}")
        if not 0.0 < self.temperature < float("inf"):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")


class ScoredGroup(_Base, tag="scored_group"):
    """Judges -> learner, on the scored stream: the rollout with one reward and verdict per sample."""

    rollout: RolloutGroup
    rewards: Array  # float32 [n_samples]
    verdicts: list[str]  # one of VERDICTS per sample
    judge_id: str = ""
    timings: dict[str, float] = msgspec.field(default_factory=dict)  # seconds: verify_s, queue_wait_s
    created_at: float = msgspec.field(default_factory=now)

    def __post_init__(self) -> None:
        super().__post_init__()
        n = len(self.rollout.samples)
        if self.rewards.shape != [n] or len(self.verdicts) != n:
            raise ValueError(f"{n} samples but rewards {self.rewards.shape} and {len(self.verdicts)} verdicts")
        bad = sorted(set(self.verdicts) - set(VERDICTS))
        if bad:
            raise ValueError(f"unknown verdicts {bad}")

    @property
    def group_id(self) -> str:
        return self.rollout.group_id


class TensorSpec(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    """Where one parameter lives inside a flat weight bucket."""

    name: str  # Hugging Face parameter name, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: list[int]
    offset: int  # element offset inside the bucket
    numel: int


class BucketSpec(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    """One flat tensor sent by one broadcast."""

    dtype: str  # torch dtype name without the prefix: "float32", "bfloat16"
    numel: int
    tensors: list[TensorSpec]


class SharedBucket(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    """Where a worker on the learner's device opens one bucket the learner shares (weightsync/shared.py).

    CPU: `path` is a file in /dev/shm the worker maps. CUDA: the fields of torch's CUDA IPC export of the
    bucket's storage (`UntypedStorage._share_cuda_`), spelled out so that no pickle crosses Redis.
    """

    path: str = ""
    handle: bytes = b""
    size_bytes: int = 0
    offset_bytes: int = 0
    ref_counter_handle: bytes = b""
    ref_counter_offset: int = 0
    event_handle: bytes = b""
    event_sync_required: bool = False


class SharedWeights(msgspec.Struct, forbid_unknown_fields=True):
    """The learner's shared copy of the weights: one SharedBucket per BucketSpec of the announcement."""

    node: str  # host of the learner: only workers on it may open the buckets
    device: str  # "cpu", or the GPU's UUID: a GPU worker opens them only on the same GPU
    seq: int  # even: the buckets hold this announcement's version while the policy hash's shared_seq equals it
    buckets: list[SharedBucket]


class JoinRequest(_Base, tag="join_request"):
    """Generation worker -> learner, in the policy hash (`join:<worker_id>`): ask to receive the weights.

    `node` and `device` say where the worker's engine runs, so the learner can hand a worker on its own device
    the shared buffers instead of a place in the NCCL/gloo group (two ranks on one GPU cannot form one)."""

    worker_id: str
    node: str = msgspec.field(default_factory=default_node)
    device: str = "cpu"  # "cpu" or the GPU's UUID
    sent_at: float = msgspec.field(default_factory=now)


class WeightAnnouncement(_Base, tag="weight_announcement"):
    """Learner -> generation workers, in the policy hash: what the next broadcast carries and how to join."""

    version: int  # policy version the broadcast installs
    epoch: int  # weight-group generation; membership changes bump it
    backend: str  # "gloo" | "nccl" | "filesystem"
    master_addr: str
    master_port: int
    world_size: int  # learner rank 0 + admitted workers
    members: list[str]  # worker ids in rank order (rank i+1)
    buckets: list[BucketSpec]
    checkpoint_path: str = ""  # latest safetensors directory a joining worker loads first
    timeout_s: float = 60.0  # the watchdog bound every member applies to the broadcast
    shared: SharedWeights | None = None  # the same weights in buffers workers on the learner's device open
    shared_members: list[str] = msgspec.field(default_factory=list)  # workers that load from `shared`
    created_at: float = msgspec.field(default_factory=now)


class WorkerHeartbeat(_Base, tag="worker_heartbeat"):
    """Any role -> the registry, every few seconds, with a TTL."""

    worker_id: str
    role: str  # "generate" | "judge" | "learner"
    node: str = msgspec.field(default_factory=default_node)
    pid: int = msgspec.field(default_factory=os.getpid)
    accelerator: str = "cpu"  # "cpu" | "cuda:NVIDIA H100 80GB HBM3" | ...
    capacity: int = 1  # prompts this worker takes per batch
    policy_version: int = -1
    status: str = "idle"  # "starting" | "idle" | "busy" | "syncing" | "stopping"
    throughput: float = 0.0  # recent tokens/s (generate) or verifications/s (judge)
    sent_at: float = msgspec.field(default_factory=now)


class DeadLetter(_Base, tag="dead_letter"):
    """Anything that could not be handled, with the reason; `rlq dlq requeue` puts `payload` back."""

    source_stream: str
    entry_id: str
    reason: str
    deliveries: int
    payload: bytes  # the original entry's bytes, untouched
    consumer: str = ""
    failed_at: float = msgspec.field(default_factory=now)


Message = PromptBatch | RolloutGroup | ScoredGroup | WeightAnnouncement | WorkerHeartbeat | DeadLetter | JoinRequest

_encoder = msgspec.msgpack.Encoder()
_any_decoder = msgspec.msgpack.Decoder(Message)
_decoders: dict[type, msgspec.msgpack.Decoder] = {}


def encode(message: Message) -> bytes:
    """Serialise a message to msgpack bytes."""
    return _encoder.encode(message)


def decode(payload: bytes | bytearray | memoryview, expected: type | None = None) -> Message:
    """Parse and validate `payload`; with `expected`, only that message type is accepted.

    Raises:
        MessageError: for anything that is not a valid message of this schema version.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise MessageError(f"payload is {type(payload).__name__}, expected bytes")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageError(f"oversize payload: {len(payload)} bytes > limit {MAX_MESSAGE_BYTES}")
    decoder = _any_decoder if expected is None else _decoder_for(expected)
    try:
        return decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MessageError(_describe(exc)) from None
    except RecursionError:
        raise MessageError("malformed msgpack: nesting too deep") from None


def _decoder_for(kind: type) -> msgspec.msgpack.Decoder:
    if kind not in _decoders:
        _decoders[kind] = msgspec.msgpack.Decoder(kind)
    return _decoders[kind]


def _describe(exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        return f"invalid message: {text}"
    return f"malformed msgpack: {text}"


def kind_of(message: Message) -> str:
    return type(message).__struct_config__.tag  # type: ignore[return-value]
