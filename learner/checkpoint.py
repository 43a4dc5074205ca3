"""Checkpoints that lose nothing, and the ledger that proves it.

`<checkpoint_dir>/step_<N>/`:
- `policy/`: a Hugging Face directory (config, safetensors weights, tokenizer) that transformers and vLLM load.
- `optimizer.safetensors` + `optimizer.json`: optimizer tensors and param groups (no pickle anywhere).
- `rng.safetensors` + `learner_state.json`: torch/numpy/python RNG, policy version, data cursor, prompts in
  flight, group ids seen.
- `pending_groups.msgpack`: scored groups acknowledged on the stream but not yet trained on.
- `val_metrics.json` (later, when version N's validation pass completes): what `keep_top_k` ranks by.

The policy weights are saved in `checkpointing.save_dtype` (bfloat16 halves them; the optimizer state keeps its own
dtype) and loaded back into the master dtype on resume. Which checkpoints stay (`keep_last`, `keep_top_k`, the
latest always) is learner/checkpoint_select.py.

A checkpoint is written to a temporary directory and renamed into place, then `latest` is replaced: a crash at
any moment leaves the previous checkpoint intact. `<run_dir>/ledger.jsonl` lists the groups each step trained
on (and those it dropped, with the reason); on resume the steps after the checkpoint are moved to
`ledger.discarded.jsonl`, so the ledger always describes exactly the model that exists.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from broker.policy import CHECKPOINT_POLICY_DIR, CHECKPOINT_STATE_FILE, LATEST
from learner.checkpoint_select import Retention, prune

log = logging.getLogger(__name__)

LEDGER = "ledger.jsonl"
DISCARDED = "ledger.discarded.jsonl"


def step_dir(checkpoint_dir: Path, step: int) -> Path:
    return checkpoint_dir / f"step_{step}"


def save_checkpoint(
    checkpoint_dir: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer,
    optimizer_state: dict,
    state: dict,
    pending_groups: bytes,
    *,
    keep_last: int = 3,
    retention: Retention | None = None,
    save_dtype: str | None = None,
) -> Path:
    """Write step `step` atomically and make it the latest; returns its directory.

    `retention` decides which older checkpoints go (default: the newest `keep_last`); `save_dtype` ("float32",
    "bfloat16"; None: as the model holds them) is the dtype of the saved policy weights.
    """
    final = step_dir(checkpoint_dir, step)
    tmp = checkpoint_dir / f".step_{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_policy_weights(model, tmp / CHECKPOINT_POLICY_DIR, save_dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / CHECKPOINT_POLICY_DIR)
    _save_optimizer(optimizer_state, tmp)
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    full_state = {**state, "step": step, "rng": _host_rng_state()}
    (tmp / CHECKPOINT_STATE_FILE).write_text(json.dumps(full_state))
    (tmp / "pending_groups.msgpack").write_bytes(pending_groups)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_atomic(checkpoint_dir / LATEST, final.name)
    prune(checkpoint_dir, retention or Retention(keep_last=keep_last))
    return final


def save_policy_weights(model: torch.nn.Module, directory: Path, dtype: str | None) -> None:
    """`save_pretrained` in `dtype`: floating tensors cast (tied ones stay one tensor), config.json saying so."""
    target = getattr(torch, dtype) if dtype else None
    if target is None or all(p.dtype == target for p in model.state_dict().values() if p.is_floating_point()):
        model.save_pretrained(directory, safe_serialization=True)
        return
    cast: dict[int, torch.Tensor] = {}  # data_ptr -> cast copy: a tied embedding and head stay shared

    def convert(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        return cast.setdefault(t.data_ptr(), t.detach().to(target))

    state = {name: convert(t) for name, t in model.state_dict().items()}
    model.save_pretrained(directory, state_dict=state, safe_serialization=True)
    config = json.loads((directory / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):  # transformers >= 4.56 writes `dtype`, older ones `torch_dtype`
        if key in config:
            config[key] = dtype
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_checkpoint(path: Path) -> tuple[dict, bytes, dict]:
    """Restore the RNG from `path` and read the rest (the model is loaded from `path/policy` by the caller).

    Returns:
        (learner state dict, pending groups bytes, optimizer state dict as `Optimizer.state_dict()` gives it).
    """
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
    state = json.loads((path / CHECKPOINT_STATE_FILE).read_text())
    _set_host_rng_state(state["rng"])
    return state, (path / "pending_groups.msgpack").read_bytes(), _load_optimizer(path)


def _save_optimizer(sd: dict, directory: Path) -> None:
    """Tensors to safetensors as `<param key>.<state name>`; param keys are indices (DDP) or names (FSDP)."""
    tensors = {
        f"{index}.{name}": value.detach().contiguous().cpu()
        for index, per_param in sd["state"].items()
        for name, value in per_param.items()
        if torch.is_tensor(value)
    }
    scalars = {
        f"{index}.{name}": value
        for index, per_param in sd["state"].items()
        for name, value in per_param.items()
        if not torch.is_tensor(value)
    }
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def _load_optimizer(directory: Path) -> dict:
    meta = json.loads((directory / "optimizer.json").read_text())
    state: dict = {}
    for key, value in {**load_file(str(directory / "optimizer.safetensors")), **meta["scalars"]}.items():
        index, name = key.rsplit(".", 1)
        state.setdefault(int(index) if index.isdigit() else index, {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _host_rng_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _set_host_rng_state(rng: dict) -> None:
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Ledger:
    """`<run_dir>/ledger.jsonl`: one line per step, `{"step", "trained": [group ids], "dropped": {reason: [...]}}`."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LEDGER
        self.discarded = run_dir / DISCARDED

    def append(self, step: int, trained: list[str], dropped: dict[str, list[str]]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "trained": trained, "dropped": dropped}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def rewind(self, step: int) -> int:
        """Keep steps <= `step` (the checkpoint resumed from); move later ones aside. Returns lines moved."""
        if not self.path.exists():
            return 0
        keep, later = [], []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill: it belonged to an unfinished step
                continue
            (keep if record["step"] <= step else later).append(line)
        if later:
            with open(self.discarded, "a", encoding="utf-8") as fh:
                fh.writelines(f"{line}\n" for line in later)
        _write_atomic(self.path, "".join(f"{line}\n" for line in keep))
        return len(later)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
