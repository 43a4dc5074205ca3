"""`rlq rescore` as a user types it: a run directory whose rollout log was written by the learner's own writer
(learner/rollout_log.py) with the default judge's verdicts, re-judged by real Celery judge processes on a private
Redis under another answer rule; the flips it reports must be the ones the two rules give sample by sample.

The completions are the disagreements the rule change is about (issue #18): an answer spread over several boxes,
a `Final Answer:` line after an intermediate box; plus answers both rules score alike.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from broker.schemas import Array, Prompt, RolloutGroup, Sample, ScoredGroup
from learner.config import GRPOConfig
from learner.rollout_log import RolloutLog
from learner.runtime_config import RolloutLogConfig
from rlq.config import load_run_config, save_resolved
from workers.judge.verify import quiet_math_verify, reward_of, verify

REPO = Path(__file__).resolve().parents[2]

GROUPS = [  # (ground truth, completions)
    ("2, 3", ["The roots are \\boxed{2} and \\boxed{3}.", "So x = 2 or x = 3, Answer: 3", "\\boxed{2}, \\boxed{3}",
              "no idea"]),
    ("42", ["First \\boxed{7} is the count per row. Final Answer: 42", "**Final Answer:** 42",
            "Answer: 42", "Answer: 41"]),
    ("{1,2,3}", ["\\boxed{1}, \\boxed{2}, \\boxed{3}", "The set is \\boxed{\\{1,2,3\\}}", "\\boxed{3}",
                 "I give up"]),
]  # fmt: skip


def write_run(run_dir: Path, model_dir: Path, rule: str) -> list[list[str]]:
    """A run directory as `rlq train` leaves it: config.yaml and a rollout log whose verdicts are `rule`'s."""
    cfg = load_run_config(REPO / "configs" / "tiny_arith_cpu.yaml",
                          [f"policy.model_name={model_dir}", f"data.path={run_dir / 'data'}",
                           f"logger.log_dir={run_dir}"])  # fmt: skip
    save_resolved(cfg, run_dir / "config.yaml")
    log = RolloutLog(RolloutLogConfig(), run_dir / "rollouts", GRPOConfig())
    verdicts = []
    for index, (truth, texts) in enumerate(GROUPS):
        samples = [Sample(token_ids=Array.from_numpy(np.arange(3) + i, "int32"),
                          logprobs=Array.from_numpy(np.full(3, -0.5), "float32"), finish_reason="stop", text=t)
                   for i, t in enumerate(texts)]  # fmt: skip
        prompt = Prompt(prompt_id=f"p{index}", token_ids=Array.from_numpy(np.arange(5), "int32"), ground_truth=truth,
                        text=f"problem {index}")  # fmt: skip
        rollout = RolloutGroup(group_id=f"p{index}@b0", batch_id="b0", prompt=prompt, samples=samples,
                               policy_version=0, worker_id="gen-0")  # fmt: skip
        group_verdicts = [verify(t, truth, rule) for t in texts]
        verdicts.append(group_verdicts)
        scored = ScoredGroup(rollout=rollout, verdicts=group_verdicts, judge_id="judge-0",
                             rewards=Array.from_numpy([reward_of(v) for v in group_verdicts], "float32"))  # fmt: skip
        if index < 2:
            log.trained(1, [scored])
        else:
            log.dropped(scored, "stale", 1)
    log.close()
    return verdicts


def test_rescore_reports_the_flips_of_another_answer_rule(tmp_path, tiny_model_dir):
    quiet_math_verify()
    run_dir = tmp_path / "run"
    before = write_run(run_dir, tiny_model_dir, "nemo_gym")
    after = [[verify(t, truth, "last_box") for t in texts] for truth, texts in GROUPS]
    expected: dict[str, int] = {}
    for b, a in zip(sum(before, []), sum(after, []), strict=True):
        if b != a:
            expected[f"{b}->{a}"] = expected.get(f"{b}->{a}", 0) + 1
    assert expected, "the cases were chosen because the two rules disagree on some of them"

    proc = subprocess.run([sys.executable, "-m", "rlq", "rescore", "--run-dir", str(run_dir), "--judges", "2",
                           "--concurrency", "1", "env.math.answer_rule=last_box"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verdicts changed" in proc.stdout and "BEFORE \\ AFTER" in proc.stdout

    report = json.loads((run_dir / "rescore" / "rescore.json").read_text())
    assert report["groups"] == 3 and report["samples"] == 12 and report["dead_lettered"] == []
    assert report["flips"] == expected
    assert report["judge_before"]["answer_rule"] == "nemo_gym" and report["judge_after"]["answer_rule"] == "last_box"
    rows = pd.read_parquet(run_dir / "rescore" / "rescored.parquet").sort_values(["group_id", "sample_index"])
    assert rows["verdict_before"].tolist() == sum(before, [])
    assert rows["verdict_after"].tolist() == sum(after, [])
    assert rows["reward_after"].tolist() == [reward_of(v) for v in sum(after, [])]
    assert set(rows["dropped_reason"].dropna()) == {"stale"}  # dropped groups are re-judged too
    saved = (run_dir / "rescore" / "config.yaml").read_text()
    assert "rescore" in saved and "password" not in saved.lower()


def test_rescore_refuses_settings_that_are_not_the_judges(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    write_run(run_dir, tiny_model_dir, "nemo_gym")
    proc = subprocess.run([sys.executable, "-m", "rlq", "rescore", "--run-dir", str(run_dir), "grpo.max_num_steps=3"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("rlq: rlq rescore takes only env.math.*")
    missing = subprocess.run([sys.executable, "-m", "rlq", "rescore", "--run-dir", str(tmp_path / "nowhere")],
                             cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and "config.yaml does not exist" in missing.stderr
