"""The tiny policy: built offline, loads in transformers and in vLLM's CPU build, and generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlq.data import COMPACT_TEMPLATE, DAPO_TEMPLATE
from rlq.tiny_policy import IM_END, PAD, build_base_model, load_policy

CHAT = [{"role": "user", "content": COMPACT_TEMPLATE.format(problem="12+34")}]


def test_tokenizer_round_trips_templates(tiny_model_dir: Path) -> None:
    _, tok = load_policy(tiny_model_dir)
    for text in (
        DAPO_TEMPLATE.format(problem="Let $x^2 = 4$, with x > 0. Find $\\frac{x}{2}$.\n  Ünïcode 中文 tabs\tok"),
        COMPACT_TEMPLATE.format(problem="98-7*6+5"),
    ):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert tok.eos_token == IM_END and tok.pad_token == PAD
    # digits are always single tokens: the model sees place value, not arbitrary merges
    assert tok.convert_ids_to_tokens(tok("12345", add_special_tokens=False)["input_ids"]) == list("12345")


def test_chat_template_is_qwen_style(tiny_model_dir: Path) -> None:
    _, tok = load_policy(tiny_model_dir)
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == f"<|im_start|>user\n{CHAT[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2
    assert tok.decode(ids) == text


def test_base_model_loads_in_transformers_and_generates(tiny_model_dir: Path) -> None:
    import torch

    model, tok = load_policy(tiny_model_dir)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["head_dim"] in (32, 64)
    assert cfg["eos_token_id"] == tok.eos_token_id
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 1 and len(ids) < out.shape[1] <= len(ids) + 6
    assert next(model.parameters()).dtype == torch.float32


def test_build_is_deterministic_and_cached(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = build_base_model(tmp_path / "again", seed=0)
    assert (other / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_text() == (tiny_model_dir / "tokenizer.json").read_text()
    stamp = (other / "model.safetensors").stat().st_mtime_ns
    build_base_model(other, seed=0)  # same code + seed: nothing is rewritten
    assert (other / "model.safetensors").stat().st_mtime_ns == stamp


VLLM_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"

    if __name__ == "__main__":
        from vllm import LLM, SamplingParams

        llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, seed=0, enforce_eager=True)
        prompt = llm.get_tokenizer().apply_chat_template(json.loads(sys.argv[2]), add_generation_prompt=True,
                                                         tokenize=False)
        out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, logprobs=0))[0].outputs[0]
        print("RESULT " + json.dumps({"ids": list(out.token_ids), "n_logprobs": len(out.logprobs)}))
    """
)


@pytest.mark.vllm
def test_base_model_loads_in_vllm_cpu_and_generates(tiny_model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "gen.py"
    script.write_text(VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir), json.dumps(CHAT)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT ") :])
    assert 1 <= len(result["ids"]) <= 8 and result["n_logprobs"] == len(result["ids"])
