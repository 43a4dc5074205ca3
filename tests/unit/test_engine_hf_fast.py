"""FastHFEngine on CPU (eager decode step; the CUDA graph path is exercised by bench/gpu_generate.py on a GPU).

The strong check: every returned logprob equals the processed logprob a plain full-sequence forward assigns to
the same token, so the static cache, left padding, positions and masks are right.
"""

from __future__ import annotations

import pytest
import torch

from broker.schemas import BucketSpec, TensorSpec
from weightsync.flat import bucket_view, flatten_into_buckets
from workers.generate.config import GenerationConfig
from workers.generate.engine_hf_fast import FastHFEngine, batch_bucket, process_logits


def _tiny_model():
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, eos_token_id=3, tie_word_embeddings=True,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.mark.parametrize(("top_k", "top_p"), [(None, 1.0), (20, 0.9)])
def test_logprobs_match_a_full_forward(top_k, top_p):
    model = _tiny_model()
    cfg = GenerationConfig(backend="hf", max_new_tokens=12, temperature=0.8, top_k=top_k, top_p=top_p)
    engine = FastHFEngine(cfg, "w0", model=model)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    out = engine.generate(prompts, n=2, seeds=[7])
    assert [len(g) for g in out] == [2, 2, 2]
    checked = 0
    for prompt, group in zip(prompts, out, strict=True):
        for c in group:
            assert 1 <= len(c.token_ids) <= 12 and len(c.logprobs) == len(c.token_ids)
            seq = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                logits = model(input_ids=seq).logits[0, len(prompt) - 1 : -1]  # [T, V]
            ref = process_logits(logits, 0.8, top_k, top_p).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4), (c.logprobs, ref.tolist())
            checked += len(c.token_ids)
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == 3
    assert checked >= 6


def test_same_seed_same_samples_and_batch_buckets():
    model = _tiny_model()
    cfg = GenerationConfig(backend="hf", max_new_tokens=6)
    engine = FastHFEngine(cfg, "w0", model=model)
    a = engine.generate([[5, 6, 7]], n=3, seeds=[1])
    b = engine.generate([[5, 6, 7]], n=3, seeds=[1])
    assert [c.token_ids for c in a[0]] == [c.token_ids for c in b[0]]
    assert [batch_bucket(r, 256) for r in (1, 8, 9, 64, 65, 300)] == [8, 8, 16, 64, 128, 300]


def test_flattened_parameters_are_bucket_views():
    model = _tiny_model()
    params = dict(model.named_parameters())
    specs, offset = [], 0
    spec = BucketSpec(dtype="float32", numel=0, tensors=[])
    for name, p in params.items():
        spec.tensors.append(TensorSpec(name=name, shape=list(p.shape), offset=spec.numel, numel=p.numel()))
        spec.numel += p.numel()
        offset += p.numel()
    specs.append(spec)
    before = {n: p.detach().clone() for n, p in params.items()}
    assert bucket_view(params, spec) is None
    flatten_into_buckets(model, specs)
    params = dict(model.named_parameters())
    flat = bucket_view(params, spec)
    assert flat is not None and flat.numel() == offset
    assert all(torch.equal(before[n], p) for n, p in params.items())  # values kept
    flat.fill_(0.5)  # writing the bucket writes the model
    assert all(bool((p == 0.5).all()) for p in model.parameters())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
