"""GPU placement of a one-machine run (rlq/placement.py), the step's batch size, and the tutorial's sanity command
down to every role's config. Pure: the GPU count is an argument, so these run on a machine without GPUs."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlq.config import RunConfig, load_run_config
from rlq.errors import UserError
from rlq.placement import cuda_visible, plan_gpus
from rlq.roles import role_specs

REPO = Path(__file__).resolve().parents[2]
CONFIG_4B = REPO / "configs" / "grpo_dapo17k_qwen3_4b_instruct.yaml"
TUTORIAL_SANITY = ['logger.wandb.project="me-nemo-gym-rl-integration"', "logger.wandb.name=exp",
                   "logger.log_dir=results/exp", "grpo.val_at_start=false", "++grpo.num_prompts_per_step=4",
                   "++grpo.max_num_steps=3", "++policy.dtensor_cfg.clear_cache_every_n_steps=1",
                   "++cluster.num_nodes=1", "checkpointing.checkpoint_dir=results/exp"]  # fmt: skip


def run_config(**cluster) -> RunConfig:
    return RunConfig(cluster=cluster, policy={"model_name": "m"}, data={"path": "d"})


def test_auto_splits_the_gpus_when_there_are_enough():
    placement = plan_gpus(run_config(learner_procs_per_node=4, generation_workers=4), visible=8)
    assert placement is not None
    assert placement.learner == [0, 1, 2, 3] and placement.generation == [[4], [5], [6], [7]]
    assert not any(placement.colocated(i) for i in range(4))


def test_auto_colocates_when_there_are_fewer_gpus_than_roles():
    one = plan_gpus(run_config(learner_procs_per_node=1, generation_workers=1), visible=1)
    assert one is not None and one.learner == [0] and one.generation == [[0]] and one.colocated(0)
    four = plan_gpus(run_config(learner_procs_per_node=4, generation_workers=4), visible=4)
    assert four is not None and four.generation == [[0], [1], [2], [3]] and all(four.colocated(i) for i in range(4))
    # Free GPUs first, then the learner's.
    six = plan_gpus(run_config(learner_procs_per_node=4, generation_workers=4), visible=6)
    assert six is not None and six.generation == [[4], [5], [0], [1]]
    assert [six.colocated(i) for i in range(4)] == [False, False, True, True]


def test_explicit_lists_and_tensor_parallel_workers():
    cfg = run_config(learner_procs_per_node=2, generation_workers=2, learner_gpus="0-1", generation_gpus="2,3|4,5")
    cfg.policy.generation.vllm_cfg.tensor_parallel_size = 2
    placement = plan_gpus(cfg, visible=6)
    assert placement is not None and placement.learner == [0, 1] and placement.generation == [[2, 3], [4, 5]]
    auto = run_config(learner_procs_per_node=2, generation_workers=2)
    auto.policy.generation.vllm_cfg.tensor_parallel_size = 2
    assert plan_gpus(auto, visible=6).generation == [[2, 3], [4, 5]]  # type: ignore[union-attr]


def test_no_gpus_and_null_lists_leave_the_environment_alone():
    placement = plan_gpus(run_config(generation_workers=2), visible=0)
    assert placement is not None and placement.learner == [] and placement.generation == [[], []]
    assert plan_gpus(run_config(learner_gpus=None, generation_gpus=None), visible=8) is None


@pytest.mark.parametrize(
    ("cluster", "visible", "message"),
    [
        ({"learner_gpus": "0", "generation_gpus": "8"}, 8, r"cluster.generation_gpus='8' names GPU 8, but this machine "
                                                            r"has 8 visible \(0-7\)"),
        ({"learner_gpus": "3"}, 2, "names GPU 3"),
        ({"learner_procs_per_node": 4}, 1, r"learner_procs_per_node=4 needs 4 GPUs .* set "
                                           r"cluster.learner_procs_per_node=1"),
        ({"learner_procs_per_node": 2, "learner_gpus": "0"}, 4, "names 1 GPUs for cluster.learner_procs_per_node=2"),
        ({"generation_gpus": "1,2"}, 4, "gives a worker 2 GPUs"),
        ({"learner_gpus": "0"}, 0, "names GPUs but this machine has none visible"),
    ],
)  # fmt: skip
def test_lists_that_cannot_work_are_one_line_errors(cluster, visible, message):
    with pytest.raises(UserError, match=message) as info:
        plan_gpus(run_config(**cluster), visible)
    assert "\n" not in str(info.value)


def test_workers_sharing_a_gpu_may_not_ask_for_all_of_it():
    cfg = run_config(generation_workers=4)
    cfg.policy.generation.vllm_cfg.colocated_gpu_memory_utilization = 0.3
    with pytest.raises(UserError, match=r"generation workers on GPU 0 would take 1.20 of its memory"):
        plan_gpus(cfg, visible=1)
    cfg.cluster.generation_workers = 2
    assert plan_gpus(cfg, visible=1) is not None


@pytest.mark.parametrize(("field", "value"), [("learner_gpus", "zero"), ("generation_gpus", "0|1|2")])
def test_gpu_list_syntax_is_checked_when_the_config_loads(field, value):
    with pytest.raises(ValueError, match=rf"cluster.{field}"):
        run_config(generation_workers=2, **{field: value})


def test_each_role_sees_only_its_gpus_and_a_colocated_worker_starts_first(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = run_config(learner_procs_per_node=1, generation_workers=2)
    placement = plan_gpus(cfg, visible=2)
    specs = {s.name: s for s in role_specs(cfg, tmp_path / "c.yaml", placement)}
    assert specs["learner"].env["CUDA_VISIBLE_DEVICES"] == "0"
    assert specs["generate-0"].env["CUDA_VISIBLE_DEVICES"] == "1" and specs["generate-0"].wait_ready is None
    colocated = specs["generate-1"]
    assert colocated.env["CUDA_VISIBLE_DEVICES"] == "0" and colocated.wait_ready == "default-gen-1"
    assert "policy.generation.vllm_cfg.gpu_memory_utilization=0.3" in colocated.argv
    order = [s.name for s in role_specs(cfg, tmp_path / "c.yaml", placement)]
    assert order.index("generate-1") < order.index("learner")
    # An inherited CUDA_VISIBLE_DEVICES is mapped through: our GPU 1 is the machine's GPU 6.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    assert cuda_visible([1]) == "6"


def test_the_step_batch_defaults_to_the_whole_step_and_a_non_divisor_is_refused():
    cfg = load_run_config(CONFIG_4B)
    assert cfg.policy.train_global_batch_size is None
    with pytest.raises(ValueError, match=r"train_global_batch_size=1000 does not divide the step's 1024 samples"):
        load_run_config(CONFIG_4B, ["policy.train_global_batch_size=1000"])
    assert load_run_config(CONFIG_4B, ["policy.train_global_batch_size=256"]).policy.train_global_batch_size == 256


def test_the_tutorials_sanity_command_builds_every_roles_config(monkeypatch):
    monkeypatch.setenv("RLQ_BROKER_URL", "redis://127.0.0.1:6379/0")
    cfg = load_run_config(CONFIG_4B, TUTORIAL_SANITY)
    learner = cfg.learner_config()  # what `rlq learner` builds; it refused 1024 of 64 samples before
    assert learner.policy.train_global_batch_size is None and learner.grpo.num_prompts_per_step == 4
    assert learner.learner.weight_sync.transport.share_memory == "auto"
    assert cfg.policy.generation.backend == "vllm" and cfg.policy.generation.vllm_cfg.precision == "bfloat16"
    assert cfg.env.math.answer_timeout_s == 10
    one_gpu = load_run_config(CONFIG_4B, [*TUTORIAL_SANITY, "cluster.learner_procs_per_node=1",
                                          "cluster.generation_workers=1"])  # fmt: skip
    placement = plan_gpus(one_gpu, visible=1)
    assert placement is not None and placement.colocated(0)
