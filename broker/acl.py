"""Redis ACL users of one run: one user per role kind, each limited to the run's keys and the commands it uses.

A run has one secret (`RLQ_REDIS_SECRET`, generated per run unless the user gives one). Each user's password is
derived from it (HMAC-SHA256 of the user name), so a role is handed only its own password and the server's ACL
file holds only SHA-256 hashes of those. The `default` user is locked behind a password nobody holds (not off:
see `RunAcl.default_rules`), so a client that does not log in as one of these users can run no command at all.

Users (a role picks its user with `RLQ_REDIS_USER` and its password with `RLQ_REDIS_PASSWORD`):

- `rlq-generate`  generation workers: read prompts, publish judge tasks, heartbeat, ask to join the weight group.
- `rlq-judge`     judge workers (Celery): consume the judge queue, write the scored stream.
- `rlq-learner`   the learner and its feeder: write prompts and the policy, read scored.
- `rlq-operator`  the launcher, `rlq scale`, `rlq dlq requeue|purge`: the run's keys, no server administration.
- `rlq-inspect`   `rlq queues|peek|dlq list|workers|top`, the metrics endpoint: reads only.

The command lists were measured by running the real roles under MONITOR (docs/security.md lists them); no user
gets FLUSHALL, FLUSHDB, CONFIG, SHUTDOWN, DEBUG, MODULE, REPLICAOF, MIGRATE, KEYS, ACL or MONITOR.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from broker.connection import PASSWORD_ENV, USER_ENV
from broker.keys import WEIGHT_TOKEN_ENV, Keys

SECRET_ENV = "RLQ_REDIS_SECRET"
"""The run secret: held by whoever starts the broker and the roles (launcher, Slurm batch script), never a role."""

GENERATE, JUDGE, LEARNER, OPERATOR, INSPECT = "rlq-generate", "rlq-judge", "rlq-learner", "rlq-operator", "rlq-inspect"
USERS = (GENERATE, JUDGE, LEARNER, OPERATOR, INSPECT)
ADMIN = "rlq-admin"
"""Every right; only in ACL files written with an admin password (tests, fault injection), never a role's."""

DENIED = ("flushall", "flushdb", "config", "shutdown", "debug", "module", "replicaof", "slaveof", "migrate", "keys",
          "acl", "monitor", "save", "bgsave", "bgrewriteaof", "swapdb", "failover", "script|flush", "client|kill",
          "cluster", "restore", "sync", "psync")  # fmt: skip
"""Never granted; listed after each user's grants so `ACL GETUSER` shows them refused outright."""

CONNECTION = ("ping", "echo", "hello", "select", "client|setname", "client|getname", "client|id",
              "multi", "exec", "discard", "watch", "unwatch")  # fmt: skip
"""What every client's connection itself sends (redis-py names its connection, pipelines run in MULTI/EXEC)."""
STREAM_READ = ("xrange", "xrevrange", "xlen", "xinfo|stream", "xinfo|groups", "xinfo|consumers", "xpending")
STREAM_CONSUME = ("xreadgroup", "xack", "xautoclaim", "xclaim", "xgroup|create", "xgroup|createconsumer")
SCRIPTS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "script|load", "script|exists")
"""Lua: the ack-and-trim script (broker/trim.py) and inspection's counts. Keys a script touches are checked
against the caller's key permissions like any command's."""
HASH_READ = ("hget", "hgetall", "hmget", "hexists", "hlen", "hkeys")
HASH_WRITE = ("hset", "hdel")
KEY_READ = ("exists", "type", "get", "ttl", "pttl", "scan")
CELERY_PRODUCE = ("lpush", "smembers", "sadd", "publish")
"""Publishing a task: kombu reads the exchange's bindings (declaring the queue binds it) and LPUSHes the message."""
CELERY_CONSUME = (*CELERY_PRODUCE, "brpop", "rpop", "llen", "del", "set", "get", "exists", "zadd", "zrem", "zrange",
                  "zrangebyscore", "hget", "hset", "hdel", "hscan", "srem", "pexpire", "time", "rpush", "subscribe",
                  "psubscribe", "unsubscribe", "punsubscribe")  # fmt: skip
"""A Celery worker: BRPOP the queue, keep the unacked hash/index/mutex, answer `celery inspect` (pidbox)."""


def _hashed(password: str) -> str:
    """A password as an ACL file holds it: `#` and its SHA-256, so the file never holds a password itself."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def password_for(secret: str, user: str) -> str:
    """The password of `user` in the run whose secret is `secret` (hex; never logged, never on a command line)."""
    return hmac.new(secret.encode(), user.encode(), hashlib.sha256).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class RunAcl:
    """The ACL of run `run`: rules per user, and the ACL file the server loads (`aclfile`)."""

    run: str

    def _run_keys(self) -> Keys:
        return Keys(self.run)

    def key_patterns(self, user: str) -> list[str]:
        """Key selectors: `%R~` read, `%W~` write, `~` both (Redis 7 ACL syntax)."""
        k = self._run_keys()
        run_all, queue = f"rlq:{self.run}:*", f"{k.judge_queue}*"
        own_heartbeat = [f"~{k.workers}", f"~{k.worker_alive('*')}"]
        binding = f"~_kombu.binding*.{k.judge_queue}"  # kombu 5.7 also keeps `_kombu.binding_permanent.<queue>`
        unacked = ["~unacked", "~unacked_index", "~unacked_mutex"]  # kombu's, shared by a database's queues
        deadlines = "~_kombu.binding_deadlines"  # kombu 5.7: when each exchange's binding table expires
        if user == GENERATE:
            return [f"~{k.prompts}*", f"~{k.policy}", f"~{k.dead}", *own_heartbeat, f"%R~{k.scale}",
                    f"~{queue}", binding]  # fmt: skip
        if user == JUDGE:
            # Celery's remote control (`celery inspect`, `rlq queues --celery`): each worker's `<hostname>.celery.
            # pidbox` queue (with its priority lists), the replies' queues and the broadcast exchanges' bindings.
            pidbox = ["~_kombu.binding*.celery.pidbox", "~*.celery.pidbox*", "~_kombu.binding*.celeryev"]
            return [f"~{k.scored}*", f"~{k.dead}", f"%R~{k.policy}", *own_heartbeat, f"~{queue}", binding,
                    *unacked, deadlines, *pidbox]  # fmt: skip
        if user == LEARNER:
            return [f"~{run_all}", f"%R~{queue}", *[f"%R{u}" for u in unacked]]
        if user == OPERATOR:
            return [f"~{run_all}", f"%R~{queue}", *[f"%R{u}" for u in unacked]]
        if user == INSPECT:
            return [f"%R~{run_all}", f"%R~{queue}", *[f"%R{u}" for u in unacked], f"%R{binding}"]
        raise ValueError(f"unknown Redis user {user!r}; one of {', '.join(USERS)}")

    def commands(self, user: str) -> list[str]:
        """Commands granted to `user` (everything else is refused)."""
        streams = (*STREAM_READ, *STREAM_CONSUME, "xadd", "xdel", "xtrim", *SCRIPTS)
        heartbeat = (*HASH_READ, *HASH_WRITE, "set", "del", "exists", "expire", "pexpire")
        if user == GENERATE:
            return [*CONNECTION, *streams, *heartbeat, "sismember", "llen", *CELERY_PRODUCE]
        if user == JUDGE:
            return [*CONNECTION, *streams, *heartbeat, "sismember", *CELERY_CONSUME]
        if user in (LEARNER, OPERATOR):
            return [*CONNECTION, *streams, *heartbeat, *KEY_READ, "sismember", "sadd", "smembers", "llen", "hscan",
                    "zscore", "time"]  # fmt: skip
        if user == INSPECT:
            return [*CONNECTION, *STREAM_READ, *HASH_READ, *KEY_READ, "eval_ro", "evalsha_ro", "script|load", "llen",
                    "lrange", "hscan", "zscore", "smembers", "sismember", "time", "info"]  # fmt: skip
        raise ValueError(f"unknown Redis user {user!r}; one of {', '.join(USERS)}")

    def rules(self, user: str) -> list[str]:
        """`ACL SETUSER <user> <rules...>` without the password."""
        return ["reset", *self.key_patterns(user), "resetchannels", *self.channels(user), "-@all",
                *(f"+{c}" for c in self.commands(user)), *(f"-{c}" for c in DENIED)]  # fmt: skip

    def channels(self, user: str) -> list[str]:
        """Pub/sub channels: Celery's broadcast (pidbox, events) for the judge, publishing only for producers."""
        if user == JUDGE:
            # PSUBSCRIBE's pattern must equal an allowed one (Redis checks patterns literally): kombu subscribes
            # to `/<db>.celery.pidbox`, and rlq's broker URLs name db 0.
            return ["&/0.celery.pidbox", "&/*.celery.pidbox", "&/*.celeryev/*"]
        if user == GENERATE:
            return ["&/*.celeryev/*"]
        return []

    def default_rules(self) -> list[str]:
        """The `default` user: every role's rights together, behind a random password that is never kept.

        Not `off`, because of a Redis bug (redis/redis#14541, valkey#3983; Redis 7.0.15 here has it): the client
        that replays the append-only file at start-up runs as `default`, and EXEC re-checks its rights, so with
        `default` off every MULTI/EXEC and every Lua script's effects (replicated as MULTI/EXEC) are silently
        dropped from a restarted broker (the fault suite's Redis SIGKILL then accounted for 8 of 40 trained
        groups). With these rights the replay succeeds, and nobody can log in as `default` (only the password's
        hash exists)."""
        keys = dict.fromkeys(p for user in USERS for p in self.key_patterns(user))  # ordered, no repeats
        channels = dict.fromkeys(c for user in USERS for c in self.channels(user))
        commands = dict.fromkeys(c for user in USERS for c in self.commands(user))
        return ["reset", *keys, "resetchannels", *channels, "-@all", *(f"+{c}" for c in commands),
                *(f"-{c}" for c in DENIED)]  # fmt: skip

    def file_text(self, secret: str, admin_password: str | None = None) -> str:
        """The server's ACL file: each user with the SHA-256 of its derived password, `default` locked (above).
        Tests (and an operator who wants one) may add `rlq-admin` with every right; no role is handed its password."""
        lines = [" ".join(["user default", *self.default_rules(), "on", _hashed(secrets.token_hex(32))])]
        for user in USERS:
            lines.append(" ".join(["user", user, *self.rules(user), "on", _hashed(password_for(secret, user))]))
        if admin_password:
            lines.append(f"user {ADMIN} on allkeys allchannels +@all {_hashed(admin_password)}")
        return "\n".join(lines) + "\n"


WEIGHT_GROUP = "rlq-weight-group"
"""Not a Redis user: the name the weight group's token is derived under (learner/broadcast.py)."""


def role_env(secret: str, user: str) -> dict[str, str]:
    """The environment a role logs in with: its user and its own password (never the run secret), and for the two
    ends of the weight sync the weight group's token."""
    if user not in USERS:
        raise ValueError(f"unknown Redis user {user!r}; one of {', '.join(USERS)}")
    env = {USER_ENV: user, PASSWORD_ENV: password_for(secret, user)}
    if user in (GENERATE, LEARNER):
        env[WEIGHT_TOKEN_ENV] = password_for(secret, WEIGHT_GROUP)
    return env


def login(secret: str, user: str) -> dict[str, str]:
    """`connect(..., login=...)` for a process that holds the secret itself (the launcher)."""
    return {"username": user, "password": password_for(secret, user)}


def write_private(path: Path, text: str) -> Path:
    """Write `text` to `path` readable by its owner only (0600 from creation: never world-readable, not even
    between open and chmod)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


def write_acl_file(path: Path, run: str, secret: str, admin_password: str | None = None) -> Path:
    """The server's ACL file for run `run` (0600: hashes only, still nobody else's business)."""
    return write_private(path, RunAcl(run).file_text(secret, admin_password))
