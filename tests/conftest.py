"""Shared fixtures: every test talks to its own real redis-server, never to one left running on the machine."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from broker.server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server on a free loopback port, for the whole session."""
    with RedisServer(directory=tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def run_name() -> str:
    """A fresh run namespace per test, so tests sharing the server never see each other's keys."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """An untrained tiny Qwen3 + locally trained tokenizer (rlq.tiny_policy.build_base_model), built once."""
    from rlq.tiny_policy import build_base_model

    return build_base_model(tmp_path_factory.mktemp("tiny-base") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_policy_dir():
    """The warm-started tiny policy (`rlq build-policy`: 20-50 % greedy on held-out arith), cached across sessions
    in $RLQ_CACHE_DIR (default ~/.cache/rlq): the first session builds it (~3 min on one core), later sessions
    reuse it while its build hash matches the code."""
    import os
    from pathlib import Path

    from rlq.warm_start import build_policy

    return build_policy(Path(os.environ.get("RLQ_CACHE_DIR", Path.home() / ".cache" / "rlq")) / "tiny-policy")
