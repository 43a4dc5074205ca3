"""Weights through shared buffers (weightsync/shared.py): a worker on the learner's device reads them in place.

On a GPU the buffers travel as CUDA IPC handles (colocated learner and vLLM worker, where NCCL cannot put both
ranks on one GPU); here, on CPU, the same protocol runs over /dev/shm files (`weight_sync.transport.share_memory=host`),
with a real redis-server, the real learner broadcast and a real generation worker (transformers engine; the vLLM
CPU engine in the slow tier). The CUDA IPC export itself runs only on a GPU (tests/gpu).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from broker.connection import connect
from broker.keys import POLICY_SHARED_SEQ, POLICY_SYNCED_PREFIX, Keys
from broker.policy import PolicyHash
from learner.broadcast import CollectiveBroadcast
from workers.generate.config import GenerationConfig
from workers.generate.engines import HFEngine
from workers.generate.sinks import StreamSink, rollout_stream
from workers.generate.worker import GenerationWorker


def _cfg() -> GenerationConfig:
    return GenerationConfig.model_validate(
        {
            "max_new_tokens": 8,
            "vllm_cfg": {"max_model_len": 256, "cpu_kvcache_space_gib": 1, "max_num_seqs": 16},
            "worker": {"sink": "stream", "read_block_ms": 100, "heartbeat_s": 0.5, "heartbeat_ttl_s": 5},
        }
    )


def _worker(engine, redis_url: str, run: str) -> GenerationWorker:
    return GenerationWorker(
        _cfg(), run=run, broker_url=redis_url, worker_id=engine.worker_id, model_name="unused",
        sink=StreamSink(connect(redis_url), rollout_stream(run)), engine=engine,
    )  # fmt: skip


def _perturbed(model_dir: Path, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _same_weights(engine: HFEngine, model: torch.nn.Module) -> bool:
    mine = dict(engine.model.named_parameters())
    return all(torch.equal(mine[n], p.detach()) for n, p in model.named_parameters())


def _sync_until(worker: GenerationWorker, version: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while worker.version < version:
        assert time.monotonic() < deadline, f"worker stuck at v{worker.version}, wanted v{version}"
        worker.sync()
        time.sleep(0.02)


@pytest.fixture
def hf_worker(tiny_model_dir, redis_url: str, run_name: str):
    worker = _worker(HFEngine(_cfg(), "hf-0", str(tiny_model_dir)), redis_url, run_name)
    yield worker
    worker.close()


def test_a_worker_on_the_learners_host_reads_the_shared_buffers(hf_worker, tiny_model_dir, redis_url, run_name):
    r = connect(redis_url)
    keys = Keys(run_name)
    learner = CollectiveBroadcast(r, keys, master_addr="127.0.0.1", bucket_bytes=1 << 16, timeout_s=10, share="host")
    hf_worker.sync()  # no announcement yet: asks to join, saying where its engine runs
    try:
        for version, seed in ((1, 1), (2, 2)):
            model = _perturbed(tiny_model_dir, seed)
            report = learner.broadcast(model, version=version)
            ann = PolicyHash(r, keys).announcement()
            assert ann is not None and ann.shared is not None
            # No group was formed: the worker is a shared member only, and the learner waited for nobody.
            assert ann.shared_members == ["hf-0"] and ann.members == [] and ann.world_size == 1
            assert report.members == ["hf-0"] and len(ann.shared.buckets) == len(ann.buckets) > 1
            assert ann.shared.seq % 2 == 0 and int(r.hget(keys.policy, POLICY_SHARED_SEQ)) == ann.shared.seq
            _sync_until(hf_worker, version)
            assert _same_weights(hf_worker.engine, model)
            assert int(r.hget(keys.policy, POLICY_SYNCED_PREFIX + "hf-0")) == version
    finally:
        learner.close()
    assert not any(Path(b.path).exists() for b in ann.shared.buckets), "close() removes the /dev/shm files"


def test_a_load_overlapping_a_rewrite_is_done_again_from_the_newer_version(
    hf_worker, tiny_model_dir, redis_url, run_name
):
    r = connect(redis_url)
    keys = Keys(run_name)
    learner = CollectiveBroadcast(r, keys, master_addr="127.0.0.1", bucket_bytes=1 << 16, timeout_s=10, share="host")
    hf_worker.sync()
    first, second = _perturbed(tiny_model_dir, 1), _perturbed(tiny_model_dir, 2)
    learner.broadcast(first, version=1)
    engine = hf_worker.engine
    real_update = engine.update_weights
    loads: list[int] = []

    def update_while_the_learner_rewrites(ann):
        loads.append(ann.version)
        if len(loads) == 1:  # the learner's next sync lands while this load reads the buffers
            learner.broadcast(second, version=2)
        return real_update(ann)

    engine.update_weights = update_while_the_learner_rewrites  # type: ignore[method-assign]
    try:
        assert hf_worker.sync()
    finally:
        learner.close()
    # The first load saw the sequence move under it and loaded again, from version 2's announcement.
    assert loads == [1, 2] and hf_worker.version == 2
    assert _same_weights(engine, second)


def test_auto_keeps_cpu_workers_in_the_group(hf_worker, tiny_model_dir, redis_url, run_name):
    """share_memory=auto shares only a GPU (colocation); CPU workers join the gloo group as before."""
    r = connect(redis_url)
    keys = Keys(run_name)
    learner = CollectiveBroadcast(r, keys, master_addr="127.0.0.1", bucket_bytes=1 << 16, timeout_s=30, share="auto")
    hf_worker.sync()
    model = _perturbed(tiny_model_dir, 3)
    syncer = threading.Thread(target=_sync_until, args=(hf_worker, 1))
    syncer.start()
    try:
        report = learner.broadcast(model, version=1)
        syncer.join(60)
        ann = PolicyHash(r, keys).announcement()
    finally:
        learner.close()
    assert ann is not None and ann.shared is None and ann.members == ["hf-0"] and report.members == ["hf-0"]
    assert _same_weights(hf_worker.engine, model)


@pytest.mark.vllm
@pytest.mark.slow
def test_the_vllm_engine_loads_shared_buffers_in_place(tiny_model_dir, redis_url, run_name):
    """The vLLM CPU engine's extension opens the buffers and loads them in place; logprobs follow the learner."""
    from workers.generate.engines import VllmEngine

    engine = VllmEngine(_cfg(), "vllm-0", str(tiny_model_dir))
    worker = _worker(engine, redis_url, run_name)
    r = connect(redis_url)
    learner = CollectiveBroadcast(r, Keys(run_name), master_addr="127.0.0.1", bucket_bytes=1 << 20, share="host")
    try:
        worker.sync()
        model = _perturbed(tiny_model_dir, 5)
        learner.broadcast(model, version=1)
        _sync_until(worker, 1)
        seq = [5, 17, 42, 99, 7, 300, 12, 64]
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, :-1].float()
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        out = engine.llm.generate([TokensPrompt(prompt_token_ids=seq)],
                                  SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)  # fmt: skip
        got = torch.tensor([d[t].logprob for d, t in zip(out[0].prompt_logprobs[1:], seq[1:], strict=True)])
        assert (got - expected).abs().max().item() <= 1e-4
    finally:
        learner.close()
        worker.close()
