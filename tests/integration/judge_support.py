"""Starting judge workers in tests the way users do: `rlq worker judge --config <run config>`."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from workers.judge.config import JudgeConfig


def judge_config_file(directory: Path, url: str, run: str, judge: JudgeConfig | None = None) -> Path:
    """A run config for the judge role alone: the judge reads `env.math`, `broker.url` and `run_name` from it (policy
    and data are required keys of every run config; a judge never opens them)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"judge-{run}.yaml"
    tree = {"run_name": run, "broker": {"url": url}, "policy": {"model_name": "unused"}, "data": {"path": "unused"},
            "env": {"math": (judge or JudgeConfig()).model_dump(mode="json")}}  # fmt: skip
    path.write_text(yaml.safe_dump(tree))
    return path


def judge_argv(config: Path, concurrency: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlq", "worker", "judge", "--config", str(config), "--concurrency", str(concurrency),
            *extra]  # fmt: skip
