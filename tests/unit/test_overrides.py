import pytest

from rlq.overrides import ConfigError, apply_overrides, load_yaml

BASE = {"grpo": {"max_num_steps": 100, "num_prompts_per_step": 64}, "logger": {"wandb": {"project": "p"}}}


def test_set_existing_key_parses_yaml_scalars():
    out = apply_overrides(BASE, ["grpo.max_num_steps=3", "logger.wandb.project=my-run"])
    assert out["grpo"]["max_num_steps"] == 3
    assert out["logger"]["wandb"]["project"] == "my-run"
    assert BASE["grpo"]["max_num_steps"] == 100, "the input tree is not modified"


def test_force_and_add_and_delete():
    out = apply_overrides(
        BASE, ["++grpo.num_prompts_per_step=4", "++cluster.num_nodes=1", "+grpo.val_at_start=false", "~logger.wandb"]
    )
    assert out["grpo"] == {"max_num_steps": 100, "num_prompts_per_step": 4, "val_at_start": False}
    assert out["cluster"] == {"num_nodes": 1}
    assert out["logger"] == {}


def test_value_types():
    out = apply_overrides({"a": {}}, ["++a.lr=1e-6", "++a.xs=[1, 2]", "++a.s='007'", "++a.n=null", "++a.t=x=y"])
    assert out["a"] == {"lr": 1e-6, "xs": [1, 2], "s": "007", "n": None, "t": "x=y"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("grpo.max_num_stepz=3", "unknown key grpo.max_num_stepz"),
        ("+grpo.max_num_steps=3", "already exists"),
        ("grpo.max_num_steps.x=3", "is not a section"),
        ("grpo", "must look like"),
        ("gr po=1", "not a dotted key path"),
        ("~grpo.nothing", "unknown key"),
    ],
)
def test_bad_overrides_say_what_is_wrong(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(BASE, [override])


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(listy)


def test_run_config_overrides_reach_keys_the_file_leaves_at_their_default():
    from pathlib import Path

    from rlq.config import load_run_config

    config = Path(__file__).resolve().parents[2] / "configs" / "tiny_arith_cpu.yaml"
    cfg = load_run_config(config, ["policy.train_global_batch_size=32", "grpo.max_num_steps=3"])
    assert cfg.policy.train_global_batch_size == 32 and cfg.grpo.max_num_steps == 3
    with pytest.raises(ConfigError, match="unknown key policy.train_global_batch_sise"):
        load_run_config(config, ["policy.train_global_batch_sise=32"])


def test_the_tutorials_sanity_run_overrides_load_on_the_4b_config():
    from pathlib import Path

    import pydantic

    from rlq.config import load_run_config

    config = Path(__file__).resolve().parents[2] / "configs" / "grpo_dapo17k_qwen3_4b_instruct.yaml"
    tutorial = ['logger.wandb.project="me-nemo-gym-rl-integration"', "logger.wandb.name=exp",
                "logger.log_dir=results/exp", "grpo.val_at_start=false", "++grpo.num_prompts_per_step=4",
                "++grpo.max_num_steps=3",
                "++policy.dtensor_cfg.clear_cache_every_n_steps=1", "++cluster.num_nodes=1",
                "checkpointing.checkpoint_dir=results/exp"]  # fmt: skip
    cfg = load_run_config(config, tutorial)
    assert cfg.grpo.num_prompts_per_step == 4 and cfg.grpo.max_num_steps == 3 and not cfg.grpo.val_at_start
    assert cfg.policy.dtensor_cfg.clear_cache_every_n_steps == 1 and cfg.logger.wandb.name == "exp"
    assert load_run_config(config).grpo.val_at_start  # validation is on unless the command line turns it off
    with pytest.raises(pydantic.ValidationError, match="max_val_samples"):
        load_run_config(config, ["grpo.max_val_samples=0"])


def test_torch_cpu_gemms_need_the_engine_in_process():
    from pathlib import Path

    import pydantic

    from rlq.config import load_run_config

    config = Path(__file__).resolve().parents[2] / "configs" / "tiny_arith_cpu.yaml"
    cfg = load_run_config(config, ["policy.generation.vllm_cfg.cpu_gemm=torch"])
    assert cfg.policy.generation.vllm_cfg.cpu_gemm == "torch"
    with pytest.raises(pydantic.ValidationError, match="cpu_gemm=torch needs vllm_cfg.cpu_in_process=true"):
        load_run_config(
            config, ["policy.generation.vllm_cfg.cpu_gemm=torch", "policy.generation.vllm_cfg.cpu_in_process=false"]
        )
    with pytest.raises(pydantic.ValidationError, match="cpu_gemm"):
        load_run_config(config, ["policy.generation.vllm_cfg.cpu_gemm=mkl"])


def test_every_command_composes_config_through_one_loader(tmp_path):
    """`rlq learner` on a learner-only file takes an override of a defaulted key, as `rlq train` does on a run
    config (it used to apply overrides to the raw YAML and refuse keys the file did not spell out)."""
    import yaml

    from learner.config import LearnerConfig
    from rlq.config import load_run_config, load_typed

    learner_only = tmp_path / "learner.yaml"
    tree = {"policy": {"model_name": "m"}, "data": {"path": "d"},
            "learner": {"run": "r", "broker_url": "redis://127.0.0.1:1/0"}}  # fmt: skip
    learner_only.write_text(yaml.safe_dump(tree))
    cfg = load_typed(learner_only, ["policy.skip_zero_advantage=false",
                                    "learner.weight_sync.transport.bucket_mb=8"], LearnerConfig)  # fmt: skip
    assert cfg.policy.skip_zero_advantage is False and cfg.learner.weight_sync.transport.bucket_mb == 8
    from pathlib import Path

    config = Path(__file__).resolve().parents[2] / "configs" / "tiny_arith_cpu.yaml"
    run = load_run_config(config, ["weight_sync.transport.timeout_s=5", "weight_sync.transport.share_memory=host",
                                   "learner.data_timeout_s=7", "broker.url=redis://127.0.0.1:1/0"])  # fmt: skip
    runtime = run.learner_config().learner  # the run config reaches every learner setting
    transport = runtime.weight_sync.transport
    assert transport.kind == "collective" and transport.timeout_s == 5 and transport.share_memory == "host"
    assert runtime.data_timeout_s == 7 and runtime.run == run.run_name


def test_weight_transport_is_a_union_switched_by_its_kind():
    """`weight_sync.transport` is one of three typed transports; switching the kind by override starts from the new
    kind's defaults (the collective's address or buckets would be refused by the filesystem transport), and a
    field of another kind is refused by name."""
    from pathlib import Path

    import pydantic

    from rlq.config import load_run_config

    config = Path(__file__).resolve().parents[2] / "configs" / "tiny_arith_cpu.yaml"
    base = ["broker.url=redis://127.0.0.1:1/0"]
    run = load_run_config(config, [*base, "weight_sync.transport.kind=filesystem",
                                   "weight_sync.transport.directory=/shared/w", "weight_sync.period=2"])  # fmt: skip
    assert run.weight_sync.transport.kind == "filesystem" and str(run.weight_sync.transport.directory) == "/shared/w"
    assert run.learner_config().learner.weight_sync.period == 2
    kept = load_run_config(config, [*base, "weight_sync.transport.port=29555", "weight_sync.transport.kind=collective"])
    assert kept.weight_sync.transport.port == 29555  # the same kind again keeps what was set
    assert load_run_config(config, [*base, "weight_sync.transport.kind=none"]).weight_sync.enabled is False
    with pytest.raises(pydantic.ValidationError, match="directory"):
        load_run_config(config, [*base, "++weight_sync.transport.directory=/x"])  # not a collective's field
    with pytest.raises(pydantic.ValidationError, match="transport.kind"):
        load_run_config(config, [*base, "++learner.weight_sync=filesystem"])  # the old key names its new home
    with pytest.raises(pydantic.ValidationError, match="transport.share_memory"):
        load_run_config(config, [*base, "++weight_sync.share_memory=host"])
