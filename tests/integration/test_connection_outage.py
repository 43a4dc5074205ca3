"""A command issued while Redis restarts waits for it instead of failing: the roles outlive a broker restart."""

from __future__ import annotations

import threading
import time

import pytest

from broker.connection import BrokerUnreachable, connect
from broker.server import RedisServer


def test_a_command_rides_out_a_restart_on_the_aof(tmp_path):
    server = RedisServer(directory=tmp_path, appendonly=True).start()
    client = connect(server.url)
    client.set("kept", "1")
    port = server.port
    server.stop(9)  # SIGKILL
    restarted: list[RedisServer] = []

    def restart() -> None:
        time.sleep(2)
        restarted.append(RedisServer(directory=tmp_path, port=port, appendonly=True).start())

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        assert client.get("kept") == b"1", "the value written before the kill survives, and the read waited"
    finally:
        thread.join()
        for s in restarted:
            s.stop()


def test_an_unreachable_broker_at_start_up_is_reported_at_once(tmp_path):
    with pytest.raises(BrokerUnreachable, match=r"^cannot reach Redis at 127\.0\.0\.1:1: "):
        connect("redis://127.0.0.1:1/0")
