"""A fast transformers generation backend: static KV cache, one CUDA graph per decode step, in-GPU sampling.

`HFEngine` (workers/generate/engines.py) calls `model.generate(output_scores=True)`: a growing cache, a few thousand
kernel launches per token from Python, and every step's [rows, vocab] scores kept until the end to recover the
sampled tokens' logprobs. `FastHFEngine` keeps the same model and the same `Engine` contract but:

- prefills once into a `StaticCache` sized [rows, heads, max_len, head_dim] (rows padded to a power of two),
  with an explicit 4-D boolean mask (left padding; every query sees itself, so pad rows stay finite);
- replays one captured CUDA graph per decode step (static input ids, positions, cache position and mask), so a
  step costs one launch instead of ~1000; on CPU, or if capture fails, the same step runs eagerly;
- samples on the GPU (temperature, top-k, top-p with `generate`'s semantics) and keeps only the sampled token's
  processed logprob per step, so memory does not grow with the vocabulary;
- receives weight broadcasts straight into the parameters (`weightsync.flat`), which keeps the addresses the
  graph was captured with; a failed in-place update reloads the checkpoint the announcement names.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from broker.errors import WeightSyncError
from broker.schemas import WeightAnnouncement
from weightsync.flat import flatten_into_buckets
from workers.generate.config import GenerationConfig
from workers.generate.engines import Completion, HFEngine, SyncStats

log = logging.getLogger(__name__)

LEN_QUANTUM = 128
"""Cache lengths are rounded up to this, so batches of similar length reuse one cache and graph."""
EXIT_CHECK_EVERY = 16
"""Decode steps between host checks for 'every row has stopped' (each check is a device sync)."""


def batch_bucket(rows: int, max_batch: int) -> int:
    """Rows rounded up to a power of two (>= 8, <= max_batch): few distinct graphs."""
    b = 8
    while b < rows:
        b *= 2
    return min(b, max(max_batch, rows))


def prefill_mask(real: torch.Tensor, max_len: int) -> torch.Tensor:
    """Boolean attention mask [B, 1, W, max_len] for a left-padded prompt block.

    Args:
        real: bool [B, W], True at prompt tokens (left padding is False).

    Query q sees key k <= q when k is a real token, and always itself (a pad row would otherwise see nothing and
    turn NaN, and NaN keys poison every later query even under a zero weight). Keys >= W are not written yet.
    """
    b, w = real.shape
    q = torch.arange(w, device=real.device)[:, None]  # [W, 1]
    k = torch.arange(max_len, device=real.device)[None, :]  # [1, M]
    causal = (k <= q) & (k < w)  # [W, M]
    key_real = torch.zeros(b, max_len, dtype=torch.bool, device=real.device)
    key_real[:, :w] = real
    return ((causal[None] & key_real[:, None, :]) | (k == q)[None])[:, None]  # [B, 1, W, M]


def process_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float) -> torch.Tensor:
    """Log-probabilities [B, V] of the distribution `generate` samples from (temperature, then top-k, then top-p)."""
    x = logits.float() / temperature  # [B, V]
    if top_k:
        kth = torch.topk(x, min(top_k, x.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        # transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p, keep at least one token.
        sorted_x, idx = torch.sort(x, dim=-1, descending=False)  # [B, V]
        cum = sorted_x.softmax(-1).cumsum(-1)  # [B, V]
        drop = cum <= 1 - top_p
        drop[:, -1] = False
        x = x.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    return torch.log_softmax(x, dim=-1)  # [B, V]


@dataclass
class _Decoder:
    """One cache and its decode step for a fixed (rows, max_len): static tensors the graph reads and writes."""

    rows: int
    max_len: int
    cache: Any
    ids: torch.Tensor  # int64 [B, 1] next input token
    pos: torch.Tensor  # int64 [B, 1] its position id
    cache_pos: torch.Tensor  # int64 [1] its cache slot
    mask: torch.Tensor  # bool [B, 1, 1, M] keys it may see
    logits: torch.Tensor | None = None  # [B, 1, V] graph output
    graph: Any = None


class FastHFEngine(HFEngine):
    """`HFEngine` with a static cache, a CUDA-graphed decode step and in-place weight updates."""

    def __init__(
        self,
        cfg: GenerationConfig,
        worker_id: str,
        model_path: str | None = None,
        device: str | None = None,
        *,
        model: torch.nn.Module | None = None,
        max_batch: int = 256,
        use_graphs: bool | None = None,
    ) -> None:
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.set_device(torch.device(device))  # NCCL and graph capture use the current device
        if model is None:
            if model_path is None:
                raise ValueError("FastHFEngine needs a model_path or a model")
            super().__init__(cfg, worker_id, model_path, device)
        else:  # an in-memory model (benches, tests): no files
            self.cfg, self.worker_id, self.torch = cfg, worker_id, torch
            self.device = next(model.parameters()).device
            self.model, self.tokenizer, self._receiver = model.eval(), None, None
            eos = getattr(model.generation_config, "eos_token_id", None)
            self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
            self.eos_ids |= set(cfg.stop_token_ids or [])
        self.max_batch = max_batch
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self._decoder: _Decoder | None = None
        self._layout: list[Any] | None = None  # bucket layout the parameters were moved into
        self._accepts_cache_position = "cache_position" in _forward_params(self.model)
        self.graph_failures = 0
        log.info("FastHFEngine on %s (decode-step graphs %s)", self.device, "on" if self.use_graphs else "off")

    # --- sampling -------------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], n: int, seeds: list[int]) -> list[list[Completion]]:
        rows = [list(p) for p in prompts for _ in range(n)]  # prompt i's samples are rows i*n .. i*n+n-1
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seeds[0] if seeds else 0)
        results: list[Completion] = []
        for start in range(0, len(rows), self.max_batch):
            tokens, logprobs = self.sample(rows[start : start + self.max_batch], gen)
            results += [self._completion(t, lp) for t, lp in zip(tokens, logprobs, strict=True)]
        return [results[i * n : (i + 1) * n] for i in range(len(prompts))]

    @torch.no_grad()
    def sample(self, rows: list[list[int]], gen: torch.Generator) -> tuple[list[list[int]], list[list[float]]]:
        """New tokens and their processed logprobs for each row (stopping is left to `_completion`)."""
        c = self.cfg
        real_rows = len(rows)
        b = batch_bucket(real_rows, self.max_batch)
        rows = rows + [rows[0]] * (b - real_rows)  # filler rows decode a copy of row 0 and are dropped
        width = max(len(r) for r in rows)
        steps = c.max_new_tokens
        dec = self._decoder_for(b, width + steps)
        dev = self.device
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=dev)  # [B, W]
        real = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=dev)  # [B, W]
        dec.cache.reset()
        pos = (real.long().cumsum(-1) - 1).clamp_min(0)  # [B, W]
        out = self._forward(
            ids, pos, torch.arange(width, device=dev), prefill_mask(real, dec.max_len), dec.cache, keep=1
        )
        dec.mask.zero_()
        dec.mask[:, 0, 0, :width] = real
        dec.pos.copy_(real.long().sum(-1, keepdim=True))  # the first new token's position = prompt length
        eos = torch.tensor(sorted(self.eos_ids) or [-1], device=dev)  # [E]
        finished = torch.zeros(b, dtype=torch.bool, device=dev)  # [B]
        toks = torch.empty(b, steps, dtype=torch.long, device=dev)  # [B, T]
        lps = torch.empty(b, steps, dtype=torch.float32, device=dev)  # [B, T]
        logits = out.logits[:, -1]  # [B, V]
        done = steps
        for t in range(steps):
            logp = process_logits(logits, c.temperature, c.top_k, c.top_p)  # [B, V]
            tok = torch.multinomial(logp.exp(), 1, generator=gen)  # [B, 1]
            toks[:, t] = tok[:, 0]
            lps[:, t] = logp.gather(1, tok)[:, 0]
            finished |= torch.isin(tok[:, 0], eos)
            if t == steps - 1 or ((t + 1) % EXIT_CHECK_EVERY == 0 and bool(finished[:real_rows].all())):
                done = t + 1
                break
            dec.ids.copy_(tok)
            dec.cache_pos.fill_(width + t)
            dec.mask[:, 0, 0, width + t] = True
            logits = self._step(dec)[:, -1]
            dec.pos.add_(1)
        return toks[:real_rows, :done].tolist(), lps[:real_rows, :done].tolist()

    def _forward(self, ids, pos, cache_pos, mask, cache, keep: int = 1) -> Any:
        kwargs: dict[str, Any] = {"cache_position": cache_pos} if self._accepts_cache_position else {}
        return self.model(
            input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=cache, use_cache=True,
            logits_to_keep=keep, **kwargs,
        )  # fmt: skip

    def _step(self, dec: _Decoder) -> torch.Tensor:
        """Logits [B, 1, V] of one decode step from the static inputs; captures the graph on first use."""
        if self.use_graphs and dec.graph is None:
            self._capture(dec)
        if dec.graph is not None:
            dec.graph.replay()
            assert dec.logits is not None
            return dec.logits
        return self._forward(dec.ids, dec.pos, dec.cache_pos, dec.mask, dec.cache).logits

    def _capture(self, dec: _Decoder) -> None:
        """Record the decode step; the warm-up run writes the slot the real step rewrites next, then rewinds."""
        lengths = _cache_lengths(dec.cache)
        saved = [t.clone() for t in lengths]
        try:
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._forward(dec.ids, dec.pos, dec.cache_pos, dec.mask, dec.cache)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t, s in zip(lengths, saved, strict=True):
                t.copy_(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                dec.logits = self._forward(dec.ids, dec.pos, dec.cache_pos, dec.mask, dec.cache).logits
            dec.graph = graph
            log.info("captured the decode step for %d rows x %d positions", dec.rows, dec.max_len)
        except RuntimeError as exc:  # capture refused (a host sync inside the model): decode eagerly
            self.graph_failures += 1
            self.use_graphs = False
            dec.graph, dec.logits = None, None
            for t, s in zip(lengths, saved, strict=True):
                t.copy_(s)
            log.warning("decode-step capture failed, decoding eagerly: %s", str(exc).splitlines()[0][:200])

    def _decoder_for(self, rows: int, length: int) -> _Decoder:
        """The cached decoder if it fits (same rows, enough positions), else a fresh cache (and graph)."""
        max_len = -(-length // LEN_QUANTUM) * LEN_QUANTUM
        dec = self._decoder
        if dec is not None and dec.rows == rows and dec.max_len >= max_len:
            return dec
        from transformers import StaticCache

        self._decoder = None  # free the old cache and graph pool first
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        dev = self.device
        dec = _Decoder(
            rows=rows,
            max_len=max_len,
            cache=StaticCache(config=self.model.config, max_cache_len=max_len),
            ids=torch.zeros(rows, 1, dtype=torch.long, device=dev),
            pos=torch.zeros(rows, 1, dtype=torch.long, device=dev),
            cache_pos=torch.zeros(1, dtype=torch.long, device=dev),
            mask=torch.zeros(rows, 1, 1, max_len, dtype=torch.bool, device=dev),
        )
        self._decoder = dec
        return dec

    # --- weights --------------------------------------------------------------------------------------------

    def update_weights(self, ann: WeightAnnouncement) -> SyncStats:
        """Receive into the parameters' own storage (laid out as the announced buckets once, before any graph)."""
        from workers.generate.weights import WeightReceiver

        if ann.backend == "filesystem":
            return self.load_file(ann.checkpoint_path)
        if self.worker_id in ann.shared_members:
            return self.load_shared(ann)  # copies into the parameters in place: the captured graph stays valid
        if self._receiver is None:
            self._receiver = WeightReceiver(self.worker_id, self.device)
        t0 = time.perf_counter()
        if self._layout != ann.buckets:
            # The graph holds parameter addresses: drop it, move the parameters, capture again at next use.
            self._decoder = None
            flatten_into_buckets(self.model, ann.buckets)
            self._layout = list(ann.buckets)
        t1 = time.perf_counter()
        params = dict(self.model.named_parameters())
        try:
            rest = self._receiver.receive(ann, into=params)
        except WeightSyncError:
            if ann.checkpoint_path:
                log.error("in-place update v%d failed; restoring %s", ann.version, ann.checkpoint_path)
                self.load_file(ann.checkpoint_path)
            raise
        t2 = time.perf_counter()
        self._copy_in(rest)  # anything not laid out in place (none after the first update)
        return SyncStats(receive_s=t2 - t1, load_s=time.perf_counter() - t2, extra={"layout_s": t1 - t0})


def _forward_params(model: torch.nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _cache_lengths(cache: Any) -> list[torch.Tensor]:
    """The per-layer fill counters a StaticCache advances inside the step (transformers >= 5.18), if any."""
    out = []
    for layer in getattr(cache, "layers", []):
        n = getattr(layer, "cumulative_length", None)
        if isinstance(n, torch.Tensor):
            out.append(n)
    return out
