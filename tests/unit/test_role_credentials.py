"""#22: the supervisor hands each role its Redis login in the environment and never writes it where it logs what it
ran (`commands.txt`); the run secret itself reaches no role."""

from __future__ import annotations

import sys
import time

from broker.acl import GENERATE, INSPECT, JUDGE, LEARNER, password_for, role_env
from rlq.supervisor import RoleSpec, Supervisor

SECRET = "unit-secret"


def test_a_role_gets_its_own_login_and_commands_txt_holds_none(tmp_path):
    base_env = {"PATH": "/usr/bin:/bin", "RLQ_REDIS_SECRET": "must-not-leak"}
    sup = Supervisor(tmp_path / "logs", base_env={k: v for k, v in base_env.items() if k != "RLQ_REDIS_SECRET"},
                     credentials=lambda user: role_env(SECRET, user))  # fmt: skip
    show = "import os; print(os.environ.get('RLQ_REDIS_USER'), os.environ.get('RLQ_REDIS_PASSWORD'), " \
           "os.environ.get('RLQ_REDIS_SECRET'), os.environ.get('RLQ_WEIGHT_TOKEN'))"  # fmt: skip
    for name, user in (("generate-0", GENERATE), ("judge", JUDGE), ("plain", "")):
        sup.start(RoleSpec(name, [sys.executable, "-c", show], env={"SOME_SETTING": "1"}, redis_user=user,
                           required=False))  # fmt: skip
    deadline = time.monotonic() + 30
    while any(role.process.poll() is None for role in sup.roles) and time.monotonic() < deadline:
        time.sleep(0.05)
    logs = {p.stem: p.read_text().split() for p in (tmp_path / "logs").glob("*.log")}
    generate_user, generate_password, secret, token = logs["generate-0"]
    assert (generate_user, generate_password, secret) == (GENERATE, password_for(SECRET, GENERATE), "None")
    assert token != "None", "the generation worker holds the weight group's token"
    assert logs["judge"][:3] == [JUDGE, password_for(SECRET, JUDGE), "None"] and logs["judge"][3] == "None"
    assert logs["plain"] == ["None"] * 4, "a role without a user gets no login"
    commands = (tmp_path / "logs" / "commands.txt").read_text()
    assert "SOME_SETTING=1" in commands, "the settings a role is given are still recorded"
    assert "RLQ_REDIS_PASSWORD=" not in commands and "RLQ_REDIS_USER=" not in commands
    assert password_for(SECRET, GENERATE) not in commands and token not in commands


def test_role_env_never_holds_the_secret():
    for user in (GENERATE, JUDGE, LEARNER, INSPECT):
        assert SECRET not in role_env(SECRET, user).values()
