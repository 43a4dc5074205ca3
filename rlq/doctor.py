"""`rlq doctor`: the tutorial's single-node sanity tests, against the config a user is about to train with.

Checks, in order, each with a one-line verdict: the GPU placement of every role; Redis answers; a real judge
worker scores known answers correctly (right, wrong, missing); the model directory loads; and a one-step run of
the whole loop in a scratch run directory, where vLLM generates, the learner takes a step and the new weights reach
the worker.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from broker.connection import PASSWORD_ENV, connect
from broker.keys import Keys
from broker.schemas import Array, Prompt, RolloutGroup, Sample, ScoredGroup
from broker.server import RedisServer
from rlq.config import BROKER_URL_ENV, RunConfig, save_resolved

log = logging.getLogger(__name__)

JUDGE_CASES = [("Adding: 2+2=4\nAnswer: 4", "4", "correct"), ("Answer: 5", "4", "incorrect"),
               ("I am not sure.", "4", "no_answer"), ("so \\boxed{\\frac{1}{2}}", "0.5", "correct")]  # fmt: skip
JUDGE_WAIT_S = 90.0


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    seconds: float


def run_doctor(cfg: RunConfig, report: Callable[[CheckResult], None]) -> bool:
    """Run every check, reporting each as it ends; True when all passed. Stops at the first failure."""
    with tempfile.TemporaryDirectory(prefix="rlq-doctor-") as scratch:
        scratch_dir = Path(scratch)
        server = None
        url = cfg.broker.url or os.environ.get(BROKER_URL_ENV)
        saved_password = os.environ.get(PASSWORD_ENV)
        if url is None:
            # A scratch server, but still no listener anyone on the host may use: a random password, handed to
            # this process's clients and its children (judge, rlq train) in the environment, not in the URL.
            password = secrets.token_hex(16)
            server = RedisServer(directory=scratch_dir / "redis", password=password).start()
            url = f"redis://127.0.0.1:{server.port}/0"
            os.environ[PASSWORD_ENV] = password
        try:
            checks: list[tuple[str, Callable[[], str]]] = [
                ("gpus", lambda: _check_gpus(cfg)),
                ("redis", lambda: _check_redis(url)),
                ("judge", lambda: _check_judge(cfg, url, scratch_dir)),
                ("model", lambda: _check_model(cfg)),
                ("loop", lambda: _check_loop(cfg, url, scratch_dir)),
            ]
            for name, check in checks:
                result = _timed(name, check)
                report(result)
                if not result.ok:
                    return False
            return True
        finally:
            if server is not None:
                server.stop()
                _restore_env(PASSWORD_ENV, saved_password)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _timed(name: str, check: Callable[[], str]) -> CheckResult:
    started = time.monotonic()
    try:
        detail, ok = check(), True
    except Exception as exc:  # a doctor reports every failure as a verdict line, whatever raised it
        text = str(exc).strip().splitlines()
        detail, ok = (text[-1] if text else type(exc).__name__), False
    return CheckResult(name, ok, detail, time.monotonic() - started)


def _check_gpus(cfg: RunConfig) -> str:
    from rlq.placement import plan_gpus, visible_gpu_count

    visible = visible_gpu_count()
    placement = plan_gpus(cfg, visible)
    if placement is None:
        return f"{visible} GPUs visible; cluster.*_gpus null: every role inherits CUDA_VISIBLE_DEVICES"
    return f"{visible} GPUs visible; {placement.describe()}"


def _check_redis(url: str) -> str:
    client = connect(url, client_name="rlq-doctor")
    version = client.info("server").get("redis_version", "?")
    client.close()
    return f"Redis {version} answers"


def _check_judge(cfg: RunConfig, url: str, scratch: Path) -> str:
    from broker.judge_queue import base_app, submit_group

    run = f"doctor-judge-{os.getpid()}"
    # The judge as `rlq train` starts it: `rlq worker judge --config`, the run's env.math on the doctor's own run.
    judge_config = scratch / "judge-config.yaml"
    save_resolved(cfg.model_copy(update={"run_name": run, "broker": cfg.broker.model_copy(update={"url": url})}),
                  judge_config)  # fmt: skip
    argv = [sys.executable, "-m", "rlq", "worker", "judge", "--config", str(judge_config), "--concurrency", "1"]
    log_path = scratch / "judge.log"
    with open(log_path, "wb") as sink:
        worker = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
    try:
        app = base_app(url, run)
        for index, (response, truth, _) in enumerate(JUDGE_CASES):
            submit_group(app, run, _known_group(f"case{index}", response, truth))
        verdicts = _await_scored(url, run, len(JUDGE_CASES), worker, log_path)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    wrong = [(case[0], case[2], verdicts.get(f"case{i}@doctor")) for i, case in enumerate(JUDGE_CASES)
             if verdicts.get(f"case{i}@doctor") != case[2]]  # fmt: skip
    if wrong:
        raise RuntimeError(f"judge verdicts differ from the known answers: {wrong}")
    return f"{len(JUDGE_CASES)} known answers scored as expected by a real judge worker"


def _known_group(prompt_id: str, response: str, truth: str) -> RolloutGroup:
    tokens = Array.from_numpy([1, 2], "int32")
    sample = Sample(token_ids=tokens, logprobs=Array.from_numpy([0.0, 0.0], "float32"), finish_reason="stop",
                    text=response)  # fmt: skip
    prompt = Prompt(prompt_id=prompt_id, token_ids=tokens, ground_truth=truth)
    return RolloutGroup(group_id=f"{prompt_id}@doctor", batch_id="doctor", prompt=prompt, samples=[sample],
                        policy_version=0, worker_id="doctor")  # fmt: skip


def _await_scored(url: str, run: str, expected: int, worker: subprocess.Popen, log_path: Path) -> dict[str, str]:
    from broker.schemas import decode
    from broker.streams import PAYLOAD_FIELD

    client = connect(url, client_name="rlq-doctor")
    deadline = time.monotonic() + JUDGE_WAIT_S
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"the judge worker exited with {worker.returncode}; see {log_path}")
        entries = client.xrange(Keys(run).scored)
        if len(entries) >= expected:
            scored = [decode(fields[PAYLOAD_FIELD], ScoredGroup) for _, fields in entries]
            return {s.group_id: s.verdicts[0] for s in scored if isinstance(s, ScoredGroup)}
        time.sleep(0.5)
    raise RuntimeError(f"no verdicts within {JUDGE_WAIT_S:.0f}s; see {log_path}")


def _check_model(cfg: RunConfig) -> str:
    from transformers import AutoConfig, AutoTokenizer

    from rlq.models import resolve_model

    name = cfg.policy.model_name
    path = resolve_model(name)  # as the learner and the workers will: its one-line error is the verdict
    config = AutoConfig.from_pretrained(path)
    tokenizer_path = resolve_model(cfg.policy.tokenizer_name) if cfg.policy.tokenizer_name else path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if tokenizer.chat_template is None:
        raise RuntimeError(f"the tokenizer of {name} has no chat template")
    where = name if path == name else f"{name} ({path})"
    return f"{where}: {config.model_type}, {config.num_hidden_layers} layers, vocab {len(tokenizer)}"


def _check_loop(cfg: RunConfig, url: str, scratch: Path) -> str:
    run_dir = scratch / "loop"
    one_step = cfg.model_copy(deep=True)
    one_step.run_name = f"doctor-loop-{os.getpid()}"
    one_step.broker.url = url
    one_step.grpo.max_num_steps = 1
    one_step.grpo.num_prompts_per_step = min(cfg.grpo.num_prompts_per_step, 4)
    one_step.grpo.prompts_per_message = min(cfg.grpo.prompts_per_message, 4)
    one_step.grpo.val_at_start, one_step.grpo.val_period = False, 0  # as the tutorial's sanity run
    one_step.logger.log_dir = run_dir
    one_step.logger.wandb_enabled = False
    one_step.checkpointing.checkpoint_dir = run_dir / "checkpoints"
    one_step.cluster.generation_workers = 1
    config_path = scratch / "doctor.yaml"
    save_resolved(one_step, config_path)
    argv = [sys.executable, "-m", "rlq", "train", "--config", str(config_path)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"rlq train exited with {result.returncode}")
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    if record.get("sync/failed", 1) or not record.get("sync/members"):
        raise RuntimeError(f"the weight sync did not reach the worker: {record.get('sync/failed')} failed")
    return (f"vLLM generated {int(record['rollout/samples'])} samples, the learner took a step, "
            f"{record['sync/bytes'] / 1e6:.1f} MB of weights reached {int(record['sync/members'])} worker(s) "
            f"in {record['sync/broadcast_s']:.2f}s")  # fmt: skip
