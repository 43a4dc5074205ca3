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
