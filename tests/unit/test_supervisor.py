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
    from rlq.roles import role_specs

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


# --- restarts (cluster.restarts) ----------------------------------------------------------------------------------


def _policy(**fields):
    from rlq.restarts import RestartPolicy

    return RestartPolicy(**{"backoff_initial_s": 0.1, "backoff_max_s": 0.15, **fields})


def _events(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_backoff_doubles_up_to_its_cap_and_the_bound_counts_one_window():
    from rlq.restarts import RestartBook, RestartPolicy

    book = RestartBook(RestartPolicy(max_restarts=3, window_s=100, backoff_initial_s=1, backoff_max_s=3))
    assert [book.next_backoff(t) for t in (0, 1, 2)] == [1, 2, 3], "1 s, 2 s, then capped at 3 s"
    assert book.next_backoff(50) is None, "a fourth death within 100 s: no restart left"
    assert book.next_backoff(101.5) == 2, "the restarts at 0 and 1 s left the window, the one at 2 s counts"
    assert book.total == 4
    quiet = RestartBook(RestartPolicy(max_restarts=3, window_s=10, backoff_initial_s=1, backoff_max_s=60))
    assert [quiet.next_backoff(t) for t in (0, 20, 40)] == [1, 1, 1], "a quiet window resets the backoff"


def test_restart_settings_are_bounded_and_checked():
    import pytest
    from pydantic import ValidationError

    from rlq.config import ClusterConfig

    assert ClusterConfig(restarts={"learner": "resume"}).restarts.learner == "resume"
    for bad in ({"max_restarts": -1}, {"window_s": 0}, {"learner": "retry"}, {"stop_grace_s": 0},
                {"backoff_initial_s": 5, "backoff_max_s": 1}, {"max_restart": 1}):  # fmt: skip
        with pytest.raises(ValidationError):
            ClusterConfig(restarts=bad)


def test_a_dying_worker_is_restarted_with_backoff_until_the_bound_then_named(tmp_path):
    events = tmp_path / "events.jsonl"
    supervisor = Supervisor(tmp_path, policy=_policy(max_restarts=2, window_s=60), events_path=events)
    die = "import sys; print('rlq: judge lost its broker', flush=True); sys.exit(3)"
    supervisor.start(RoleSpec("judge", [sys.executable, "-c", die], restart=True))
    supervisor.start(RoleSpec("learner", [sys.executable, "-c", "import time; time.sleep(60)"], finishes_run=True))
    try:
        import pytest

        with pytest.raises(RoleFailed) as failed:
            supervisor.wait()
    finally:
        supervisor.stop(grace_s=5)
    assert str(failed.value) == (
        "judge exited with code 3: rlq: judge lost its broker "
        "(no restart left: 2 within 60 s, cluster.restarts.max_restarts=2)"
    )
    recorded = _events(events)
    assert [(e["role"], e["restart"], e["backoff_s"]) for e in recorded] == [("judge", 1, 0.1), ("judge", 2, 0.15)]
    assert all(e["cause"] == "exited with code 3: rlq: judge lost its broker" for e in recorded)
    assert supervisor.restarts == {"judge": 2} and supervisor.total_restarts == 2
    assert (tmp_path / "judge.log").read_text().count("rlq: judge lost its broker") == 3, "one log, three runs"


def test_the_run_goes_on_while_a_killed_worker_restarts(tmp_path):
    marker = tmp_path / "killed-once"
    worker = (
        "import os, pathlib, signal, time\n"
        f"m = pathlib.Path({str(marker)!r})\n"
        "if not m.exists():\n"
        "    m.touch(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "time.sleep(60)\n"
    )
    events = tmp_path / "events.jsonl"
    supervisor = Supervisor(tmp_path, policy=_policy(), events_path=events)
    supervisor.start(RoleSpec("generate-1", [sys.executable, "-c", worker], restart=True))
    done = tmp_path / "learner-may-finish"
    learner = f"import pathlib, time\nwhile not pathlib.Path({str(done)!r}).exists(): time.sleep(0.05)"
    supervisor.start(RoleSpec("learner", [sys.executable, "-c", learner], finishes_run=True))
    ticks = []

    def tick():
        ticks.append(1)
        if supervisor.restarts and supervisor.roles[0].process.poll() is None:
            done.touch()  # the restarted worker runs: let the learner finish

    supervisor.wait(on_tick=tick)
    worker_process = supervisor.roles[0].process
    assert worker_process.poll() is None, "the restarted worker still runs when the run ends"
    supervisor.stop(grace_s=5)
    assert worker_process.returncode == -15, "stopped by SIGTERM"
    [event] = _events(events)
    assert event["role"] == "generate-1" and event["cause"].startswith("was killed by SIGKILL")
    assert event["restart"] == 1 and event["backoff_s"] == 0.1 and event["time"] > 0


def test_a_resuming_learner_is_restarted_and_its_clean_exit_ends_the_run(tmp_path):
    marker = tmp_path / "crashed-once"
    learner = (
        "import pathlib, sys\n"
        f"m = pathlib.Path({str(marker)!r})\n"
        "if not m.exists():\n"
        "    m.touch(); sys.exit('RuntimeError: CUDA error: an illegal memory access')\n"
    )
    supervisor = Supervisor(tmp_path, policy=_policy(learner="resume"))
    supervisor.start(RoleSpec("learner", [sys.executable, "-c", learner], finishes_run=True, restart=True))
    supervisor.wait()
    supervisor.stop(grace_s=5)
    assert supervisor.restarts == {"learner": 1} and supervisor.roles[0].process.returncode == 0


def test_stop_kills_what_a_role_started_outside_its_group_and_a_signal_stops_the_wait(tmp_path):
    import os
    import signal

    import psutil
    import pytest

    from rlq.supervisor import Stopped

    # Like torchrun: the role's child lives in a session of its own (out of reach of the group's SIGTERM), and this
    # one ignores SIGTERM too.
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    parent = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {stubborn!r}], start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    supervisor = Supervisor(tmp_path)
    supervisor.start(RoleSpec("learner", [sys.executable, "-c", parent], finishes_run=True))
    log_path = tmp_path / "learner.log"
    while not log_path.read_text().strip():
        supervisor.check()
    child = psutil.Process(int(log_path.read_text().split()[0]))
    supervisor.request_stop(signal.SIGTERM)
    with pytest.raises(Stopped, match="stopped by SIGTERM"):
        supervisor.wait()
    supervisor.stop(grace_s=1)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, "the grandchild is gone too"
    assert supervisor.roles[0].process.returncode is not None
    assert os.getpgid(os.getpid()) != supervisor.roles[0].process.pid
