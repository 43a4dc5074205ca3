"""Typed configuration of the generation role (`policy.generation` in the run config, as in NeMo RL).

Sampling knobs keep NeMo RL's names (`max_new_tokens`, `temperature`, `top_p`, `top_k`, `vllm_cfg.*`); the
worker's own runtime (stream reads, heartbeats, weight-sync deadlines) sits under `worker`. No torch or vLLM
import here: the CLI validates a config before anything heavy loads.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from broker.typed import StrictModel


class VllmConfig(StrictModel):
    """Engine settings (NeMo RL `policy.generation.vllm_cfg`)."""

    precision: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Engine dtype; float32 on CPU (bf16 has crashed the CPU engine with SIGILL)."
    )
    max_model_len: int = Field(2048, ge=16, description="Prompt + completion tokens the engine accepts.")
    gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1, description="GPU only: share of the GPU's memory vLLM takes when the worker has the GPU alone."
    )
    colocated_gpu_memory_utilization: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="GPU only: the share it takes when `rlq train` places it on a GPU it shares with learner ranks "
        "or other workers (cluster.generation_gpus); the learner uses what the workers leave. A fixed split: "
        "both sides keep their memory for the whole run, so the learner can train while vLLM samples "
        "(docs/gpu.md says why not vLLM's sleep mode).",
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs of one engine (tensor parallel).")
    cpu_kvcache_space_gib: int = Field(
        1,
        ge=1,
        le=1024,
        description="CPU only: KV cache size (VLLM_CPU_KVCACHE_SPACE). Unset, the CPU engine claims ~92 % of RAM.",
    )
    enforce_eager: bool = Field(
        False, description="Skip torch.compile and CUDA graphs (faster start, slower decoding); default compiled."
    )
    cpu_in_process: bool = Field(
        True,
        description="CPU only: run vLLM's engine core and model worker inside the generation worker's process "
        "(VLLM_ENABLE_V1_MULTIPROCESSING=0, uni executor). Otherwise the CPU build starts two more processes that "
        "busy-wait on each other every decoding step (sched_yield), taking the cores the model needs on a small "
        "machine; in-process also starts ~3x faster and a weight update makes no inter-process hops.",
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="CPU in-process only: torch threads of the model. null: the CPUs this process may run on; "
        "less one when the worker is not pinned (VLLM_CPU_OMP_THREADS_BIND unset: vLLM's own rule keeps a core "
        "for everything else).",
    )
    cpu_gemm: Literal["onednn", "torch"] = Field(
        "onednn",
        description="CPU in-process only: how linear layers compute. onednn (vLLM's default) packs each weight into "
        "a oneDNN handle, and every weight update re-packs every layer. torch keeps the weights as loaded and "
        "multiplies with torch's GEMM: an update is a copy in place (bench/generate.py: updates ~1.9x faster on "
        "the tiny policy and on a 517 MB model; tokens/s 4 % lower on the tiny policy, 25 % lower at hidden "
        "size 1024). Ignored off the CPU.",
    )
    enable_prefix_caching: bool = Field(True, description="Share prompt KV across the n samples of a prompt.")
    max_num_seqs: int = Field(256, ge=1, description="Sequences decoded together.")
    seed: int = Field(0, description="Engine seed; each batch derives per-request seeds from it.")

    @model_validator(mode="after")
    def _torch_gemm_in_process(self) -> VllmConfig:
        if self.cpu_gemm == "torch" and not self.cpu_in_process:
            raise ValueError(
                "vllm_cfg.cpu_gemm=torch needs vllm_cfg.cpu_in_process=true (it is set as the engine loads)"
            )
        return self


class PullConfig(StrictModel):
    """Capacity-aware pulls (workers/generate/pull.py): how many prompt messages one read takes.

    On, a worker takes its share of the messages waiting in the prompts stream, its share being its measured
    throughput over the fleet's (the heartbeats of the alive generation workers), so a worker three times
    slower takes a third as much and every read of the fleet ends at about the same time (docs/architecture.md).
    Off, every read takes `min_messages`.
    """

    capacity_aware: bool = Field(
        True, description="Size each read by this worker's share of the fleet's throughput; false: fixed pulls."
    )
    min_messages: int = Field(1, ge=1, le=1024, description="Fewest prompt messages one read takes.")
    max_messages: int = Field(
        16,
        ge=1,
        le=1024,
        description="Most prompt messages one read takes (they are sampled in one engine call, so this also bounds "
        "the engine's batch: max_messages x the feeder's message size x n_samples sequences).",
    )
    fleet_refresh_s: float = Field(
        1.0, gt=0, le=60, description="Seconds the fleet's throughputs (one registry read) are reused between reads."
    )

    @model_validator(mode="after")
    def _bounds(self) -> PullConfig:
        if self.min_messages > self.max_messages:
            raise ValueError("worker.pull.min_messages must not exceed worker.pull.max_messages")
        return self


class GenerateRuntime(StrictModel):
    """How the worker talks to the rest of the run."""

    capacity: int = Field(
        8,
        ge=1,
        description="Prompts advertised in the heartbeat before the first read; afterwards the heartbeat carries the "
        "prompts the last read took (what `rlq queues` shows as CAP).",
    )
    pull: PullConfig = Field(default_factory=PullConfig)
    injected_delay_per_token_s: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Bench and test only: sleep this long per generated token after each engine call, inside the "
        "timed part, so one worker of a bench (bench/heterogeneous.py) behaves like a slower accelerator. "
        "Leave 0 in real runs.",
    )
    read_block_ms: int = Field(
        50,
        ge=1,
        le=10_000,
        description="Longest blocking read on the prompts stream: also how late an idle worker may notice a weight "
        "announcement (it checks between reads), so the learner's broadcast waits up to this long for it.",
    )
    claim_idle_ms: int = Field(
        60_000, ge=100, description="A batch pending this long on a silent worker is reclaimed by another."
    )
    max_deliveries: int = Field(5, ge=1, description="A batch delivered more often goes to the dead-letter stream.")
    heartbeat_s: float = Field(2.0, gt=0, description="Seconds between heartbeats.")
    heartbeat_ttl_s: float = Field(10.0, gt=0, description="The worker counts as gone this long after its last beat.")
    sync_timeout_s: float = Field(
        120.0, gt=0, description="Own deadline on one weight update (rendezvous + all buckets + reload)."
    )
    min_version_wait_s: float = Field(
        300.0, gt=0, description="Longest wait for the weights a batch's min_policy_version asks for."
    )
    sink: Literal["celery", "stream"] = Field(
        "celery", description="celery: judge tasks (production); stream: XADD rollouts to <run>:rollouts (tests)."
    )

    @model_validator(mode="after")
    def _check(self) -> GenerateRuntime:
        if self.heartbeat_ttl_s <= self.heartbeat_s:
            raise ValueError("worker.heartbeat_ttl_s must exceed worker.heartbeat_s")
        return self


class GenerationConfig(StrictModel):
    """The generation workers: sampling, engine and runtime."""

    backend: Literal["vllm", "hf"] = Field("vllm", description="vllm (GPU or vllm-cpu) or plain transformers.")
    hf_fast: Literal["auto"] | bool = Field(
        "auto",
        description="backend hf only: the static-cache, CUDA-graphed decode (workers/generate/engine_hf_fast.py). "
        "auto: on a GPU; true also on CPU (eager steps); false: transformers' generate().",
    )
    model_name: str | None = Field(
        None, description="Weights to start from when the run has no checkpoint yet; null: policy.model_name."
    )
    max_new_tokens: int = Field(512, ge=1, description="Completion budget per sample.")
    temperature: float = Field(
        1.0,
        gt=0,
        description="Sampling temperature. Behaviour logprobs are taken at it, and the learner takes its "
        "own at the temperature each group carries (logits / T), so importance ratios compare the same distribution.",
    )
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, description="null: the whole vocabulary.")
    stop_token_ids: list[int] | None = Field(None, description="Extra stop tokens besides the model's EOS.")
    vllm_cfg: VllmConfig = Field(default_factory=VllmConfig)
    worker: GenerateRuntime = Field(default_factory=GenerateRuntime)
