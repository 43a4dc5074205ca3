"""`rlq train` on the tiny config as the e2e tests type it: small steps (8 prompts x 4 samples), no W&B, the run
directory and checkpoints under the test's tmp_path."""

from __future__ import annotations

import sys
from pathlib import Path

from rlq.data import ArithConfig, prepare_arith

REPO = Path(__file__).resolve().parents[2]


def tiny_train_argv(tmp_path: Path, model_dir: Path, *overrides: str) -> list[str]:
    """The command line (data prepared in tmp_path/arith on first use; the run in tmp_path/run)."""
    data_dir, run_dir = tmp_path / "arith", tmp_path / "run"
    if not data_dir.exists():
        prepare_arith(data_dir, ArithConfig(n_train=200, n_val=20, seed=3))
    return [sys.executable, "-m", "rlq", "train", "--config", str(REPO / "configs" / "tiny_arith_cpu.yaml"),
            f"policy.model_name={model_dir}", f"data.path={data_dir}", f"logger.log_dir={run_dir}",
            f"checkpointing.checkpoint_dir={run_dir / 'ckpt'}", "logger.wandb_enabled=false",
            "grpo.num_prompts_per_step=8", "grpo.num_generations_per_prompt=4", "grpo.prompts_per_message=4",
            *overrides]  # fmt: skip
