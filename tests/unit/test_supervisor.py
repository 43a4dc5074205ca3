import sys

from rlq.supervisor import RoleFailed, RoleSpec, Supervisor, last_error_line

TORCHRUN_TAIL = """Traceback (most recent call last):
  File "x.py", line 1, in <module>
ValueError: policy.model_name /x does not exist
E1127 08:04:35 api.py:1002] failed (exitcode: 1) local_rank: 0
Traceback (most recent call last):
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
  error_file: <N/A>
============================================================
"""


def test_last_error_line_skips_torchrun_and_rich_scaffolding(tmp_path):
    log = tmp_path / "learner.log"
    log.write_text(TORCHRUN_TAIL)
    assert last_error_line(log) == "ValueError: policy.model_name /x does not exist"
    log.write_text("│ x │\n╰────╯\nrlq: cannot reach Redis at h:1: refused\n")
    assert last_error_line(log) == "rlq: cannot reach Redis at h:1: refused"
    assert last_error_line(tmp_path / "missing.log") == "(no log)"


def test_a_failing_role_stops_the_run_and_is_named(tmp_path):
    supervisor = Supervisor(tmp_path)
    supervisor.start(RoleSpec("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"]))
    supervisor.start(RoleSpec("broken", [sys.executable, "-c", "raise SystemExit('rlq: bad thing happened')"]))
    try:
        supervisor.wait()
        raise AssertionError("wait() must raise when a role fails")
    except RoleFailed as exc:
        assert str(exc) == "broken exited with code 1: rlq: bad thing happened"
    finally:
        supervisor.stop(grace_s=5)
    assert all(role.process.poll() is not None for role in supervisor.roles), "every role stopped"
    assert "sleeper:" in (tmp_path / "commands.txt").read_text()


def test_the_finishing_role_ends_the_run_cleanly(tmp_path):
    supervisor = Supervisor(tmp_path)
    supervisor.start(RoleSpec("helper", [sys.executable, "-c", "import time; time.sleep(60)"]))
    supervisor.start(RoleSpec("learner", [sys.executable, "-c", "pass"], finishes_run=True))
    supervisor.wait()
    supervisor.stop(grace_s=5)
    assert supervisor.roles[0].process.returncode is not None


def test_a_pinned_role_runs_on_its_cpus_only(tmp_path):
    supervisor = Supervisor(tmp_path)
    supervisor.start(
        RoleSpec("pinned", [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"], cpus=[0],
                 finishes_run=True)
    )  # fmt: skip
    supervisor.wait()
    assert (tmp_path / "pinned.log").read_text().strip() == "[0]"
    assert "pinned: taskset -c 0 " in (tmp_path / "commands.txt").read_text()


def test_cpu_lists_pin_each_role_and_bad_lists_are_refused(tmp_path):
    import os

    import pytest

    from rlq.config import ClusterConfig, RunConfig
    from rlq.errors import UserError
    from rlq.launch import role_specs

    def run_config(**cluster) -> RunConfig:
        return RunConfig(cluster=cluster, policy={"model_name": "m"}, data={"path": "d"})

    cpus = sorted(os.sched_getaffinity(0))
    cfg = run_config(learner_cpus=cpus[-1], generation_cpus=str(cpus[0]), judge_cpus=str(cpus[0]))
    specs = {spec.name: spec for spec in role_specs(cfg, tmp_path / "config.yaml")}
    assert specs["learner"].cpus == [cpus[-1]] and specs["learner"].env["OMP_NUM_THREADS"] == "1"
    assert specs["generate-0"].cpus == [cpus[0]] and specs["generate-0"].env["VLLM_CPU_OMP_THREADS_BIND"] == str(
        cpus[0]
    )
    assert specs["judge"].cpus == [cpus[0]]
    assert role_specs(run_config(), tmp_path / "config.yaml")[-1].cpus is None, "no pinning unless asked"

    with pytest.raises(UserError, match=r"cluster.learner_cpus='60000' names CPUs this machine does not offer"):
        role_specs(run_config(learner_cpus="60000"), tmp_path / "config.yaml")
    for bad, message in [({"learner_cpus": "one"}, "is not a CPU list"), ({"judge_cpus": "3-"}, "is not a CPU list"),
                         ({"learner_cpus": "0,3-1"}, "is not a CPU list"),
                         ({"learner_cpus": "0-99999999"}, "is not a CPU list"),
                         ({"generation_cpus": "0|1"}, "2 '|'-separated lists for 1 generation workers")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            ClusterConfig(**bad)
