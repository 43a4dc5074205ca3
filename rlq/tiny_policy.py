"""A tiny Qwen3 policy for machines without model downloads, and the loading path every policy goes through.

`build_base_model` writes an untrained Qwen3 (random weights, float32, safetensors) with a byte-level BPE
tokenizer trained here on the arithmetic/template text: Qwen-style chat template, eos `<|im_end|>`, pad
`<|endoftext|>`, digits always single tokens (so arithmetic is learnable). transformers and vLLM (CPU) both
load the directory offline. `build_policy` adds a short supervised warm start on `arith` and stops as soon as
greedy held-out accuracy enters the band RL should start from (rlq/warm_start.py). `load_policy` loads this or
any real model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rlq.data import DAPO_TEMPLATE, TEMPLATES, ArithConfig, generate_arith
from rlq.errors import UserError
from rlq.models import resolve_model

log = logging.getLogger(__name__)

# Bump when anything that changes the built files changes (tokenizer corpus, dims, template).
BASE_VERSION = "tiny-qwen3-v2"
IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]
VOCAB_SIZE = 640
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# head_dim 32 is one of the sizes vLLM's CPU attention supports; 4 x 32 = hidden.
MODEL_DIMS: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}
BUILD_FILE = "rlq_build.json"


def tokenizer_corpus(seed: int = 0) -> list[str]:
    """Deterministic text the BPE merges are learnt from: both templates and worked arithmetic."""
    cfg = ArithConfig(n_train=3000, n_val=0, digits=4, ops="+-*", steps=3, seed=seed, template="compact")
    train, _ = generate_arith(cfg)
    texts = [DAPO_TEMPLATE.format(problem="What is x?")] * 50 + ["system\nuser\nassistant\n"] * 200
    for ex in train:
        texts.append(ex.messages[0]["content"])
        texts.append(TEMPLATES["full"].format(problem=ex.extra_info["problem"]))
        texts.append(ex.extra_info["solution"])
    return texts


def train_tokenizer(seed: int = 0) -> Any:
    """A PreTrainedTokenizerFast: byte-level BPE (round-trips any text), digits split one per token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, bos_token=None, unk_token=None, model_max_length=512
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def base_config(tokenizer: Any) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        bos_token_id=None,
        dtype="float32",
        **MODEL_DIMS,
    )


def build_hash(kind: str, **parts: Any) -> str:
    blob = json.dumps({"kind": kind, "version": BASE_VERSION, "dims": MODEL_DIMS, **parts}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached(out_dir: Path, digest: str) -> bool:
    path = out_dir / BUILD_FILE
    try:
        return json.loads(path.read_text()).get("hash") == digest and (out_dir / "model.safetensors").exists()
    except (OSError, ValueError):
        return False


def check_replaceable(out_dir: Path) -> None:
    """UserError (one line) unless a build can go to `out_dir`: checked before the minutes of a warm start."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory; choose another --output-dir")
    try:
        if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / BUILD_FILE).exists():
            raise UserError(f"{out_dir} exists and is not an rlq build; choose another --output-dir")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write {out_dir} ({exc.strerror or exc}); choose another --output-dir") from None
    if not os.access(out_dir.parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write in {out_dir.parent} (permission denied); choose another --output-dir")


def staging_dir(out_dir: Path) -> Path:
    check_replaceable(out_dir)
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as exc:
        raise UserError(
            f"cannot write in {out_dir.parent} ({exc.strerror or exc}); choose another --output-dir"
        ) from None


def publish(staging: Path, out_dir: Path, digest: str, *, force: bool = False) -> None:
    """Move a finished build into place, so no reader ever sees half a model; of two concurrent builds of the
    same hash, the second finds the first's directory and drops its own."""
    if out_dir.exists():
        if cached(out_dir, digest) and not force:
            shutil.rmtree(staging)
            return
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def build_base_model(out_dir: Path, *, seed: int = 0) -> Path:
    """Write an untrained tiny Qwen3 + its tokenizer to `out_dir` (skipped when already built with this code)."""
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    out_dir = Path(out_dir)
    digest = build_hash("base", seed=seed)
    if cached(out_dir, digest):
        log.info("tiny base model already built in %s (%s)", out_dir, digest)
        return out_dir
    staging = staging_dir(out_dir)
    random.seed(seed)
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(seed)
    model = Qwen3ForCausalLM(base_config(tokenizer)).to(torch.float32)
    save_policy(model, tokenizer, staging)
    GenerationConfig(
        eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id, do_sample=False
    ).save_pretrained(staging)
    (staging / BUILD_FILE).write_text(json.dumps({"hash": digest, "kind": "base", "seed": seed}, indent=1))
    publish(staging, out_dir, digest)
    log.info("tiny base model: %d parameters, vocab %d -> %s", model.num_parameters(), len(tokenizer), out_dir)
    return out_dir


def save_policy(model: Any, tokenizer: Any, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def load_policy(name_or_path: str | Path, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of a local directory or a hub id (resolved through the HF cache; set HF_HUB_OFFLINE=1 on
    machines without network): the one loading path for the tiny policy and real models alike."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers renamed `torch_dtype` to `dtype` in 4.56; GPU images may carry an older release
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    name = str(name_or_path)
    if (Path(name).is_absolute() or name.startswith(".")) and not Path(name).is_dir():
        raise UserError(f"policy not found: {name} (build one with 'rlq build-policy --output-dir {name}')")
    name = resolve_model(name)  # a hub id: its snapshot in the HF cache
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, **{dtype_kw: getattr(torch, dtype)})
    except OSError as exc:  # transformers' "not a local folder and not a valid model identifier" and friends
        raise UserError(f"cannot load policy {name}: {str(exc).strip().splitlines()[0]}") from None
    model = model.to(device)
    model.eval()
    return model, tokenizer
