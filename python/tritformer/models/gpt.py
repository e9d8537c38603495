"""A GPT-2 language model on tritformer's fused kernels, nanoGPT-sized and readable.

Pre-LayerNorm blocks, learned positions, tied input/output embeddings, GELU-tanh MLP; the
parameter names are nanoGPT's (GPT-2's: `transformer.wte`, `h.0.attn.c_attn`, `mlp.c_fc`, ...),
with nn.Linear weights ([out, in]; GPT-2 checkpoints store Conv1D [in, out], `from_hf`
transposes them).

Two switches pick the implementation of the two hot spots; every combination computes the same
function:
- attn_backend: "tritformer" (`tritformer.attention`, and `tritformer.decode_attention` for
  single-token steps against a KV cache), "sdpa" (torch's scaled_dot_product_attention) or
  "naive" (`tritformer.reference.attention`, the matmul attention the benchmarks compare
  against).
- mlp_backend: "tritformer" (`tritformer.ffn`: both linears, the activation and the residual
  add in one op) or "torch" (nn.Linear, GELU, nn.Linear).

Context parallelism (`GPT.set_context_parallel`): each rank of a process group holds a shard of
every sequence (``tritformer.distributed.shard_sequence`` of the token ids and targets, zigzag
or contiguous); the learned positions are the shard's global positions and every attention
layer runs `ring_attention` or `ulysses_attention` over the group (whatever attn_backend says).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Iterator, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .. import reference
from ..ops.attention import attention as fused_attention
from ..ops.ffn import ffn as fused_ffn

ATTN_BACKENDS = ("tritformer", "sdpa", "naive")
MLP_BACKENDS = ("tritformer", "torch")
CP_MODES = ("ring", "ulysses")


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """Where a context-parallel GPT's sequence lives: `group` (a torch.distributed process
    group; dist.group.WORLD for all ranks), `mode` ("ring" or "ulysses") and the shard
    `layout` ("zigzag" or "contiguous", as `tritformer.distributed.shard_sequence`)."""
    group: object
    mode: str = "ring"
    layout: str = "zigzag"

    def rank_world(self) -> tuple[int, int]:
        import torch.distributed as dist
        return dist.get_rank(self.group), dist.get_world_size(self.group)

    def positions(self, n: int, device) -> torch.Tensor:
        """Global positions [n] of this rank's n local tokens (zigzag: two chunks)."""
        from ..distributed import _shard_ranges
        rank, world = self.rank_world()
        return torch.cat([torch.arange(g, g + m, dtype=torch.long, device=device)
                          for _, g, m in _shard_ranges(rank, world, n, self.layout)])


@dataclasses.dataclass
class GPTConfig:
    """nanoGPT's configuration plus the two backend switches (module docstring)."""
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in the Linears and LayerNorms, as GPT-2
    attn_backend: str = "tritformer"
    mlp_backend: str = "tritformer"

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be a multiple of "
                             f"GPTConfig.n_head ({self.n_head})")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"GPTConfig.attn_backend must be one of {ATTN_BACKENDS}, got "
                             f"{self.attn_backend!r}")
        if self.mlp_backend not in MLP_BACKENDS:
            raise ValueError(f"GPTConfig.mlp_backend must be one of {MLP_BACKENDS}, got "
                             f"{self.mlp_backend!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {unknown}")
        return cls(**d)


class KVCache:
    """Keys and values of every layer for `GPT.generate`: [B, n_head, capacity, head_dim] per
    layer, preallocated; `length` positions are filled (the same for every sequence)."""

    def __init__(self, config: GPTConfig, batch: int, capacity: int, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (batch, config.n_head, capacity, hs)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.capacity = capacity
        self.length = 0

    def seqlens(self, batch: int, device) -> torch.Tensor:
        return torch.full((batch,), self.length, dtype=torch.int32, device=device)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT's; torch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.backend = config.attn_backend
        self.cp: Optional[ContextParallel] = None  # set by GPT.set_context_parallel

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs): strided views, the kernels read them in place
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        decode = False
        if cache is not None:
            start = cache.length
            cache.k[layer][:, :, start:start + T] = k
            cache.v[layer][:, :, start:start + T] = v
            k = cache.k[layer][:, :, :start + T]  # (B, nh, start + T, hs)
            v = cache.v[layer][:, :, :start + T]
            decode = T == 1
        p = self.dropout if self.training else 0.0
        if self.cp is not None:  # x holds this rank's shard of the sequence (GPT.forward)
            from .. import distributed
            fn = distributed.ring_attention if self.cp.mode == "ring" else distributed.ulysses_attention
            y = fn(q, k, v, group=self.cp.group, causal=True, layout=self.cp.layout, dropout_p=p)
        elif self.backend == "tritformer":
            if decode and not torch.is_grad_enabled() and p == 0.0:
                from ..ops.decode import decode_attention
                # one new query against the whole cache: split-KV (flash-decoding) kernel
                y = decode_attention(q, cache.k[layer], cache.v[layer],
                                     cache.seqlens(B, x.device) + 1)
            else:
                y = fused_attention(q, k, v, causal=True, dropout_p=p)
        elif self.backend == "sdpa":
            # torch's is_causal is top-left aligned: with a cache the new queries are the last
            # rows, so pass the bottom-right mask explicitly (decode: no mask at all)
            mask = None if (cache is None or decode) else reference.causal_mask(T, k.shape[2], x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                               is_causal=cache is None)
        else:
            y = reference.attention(q, k, v, causal=True, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.backend = config.mlp_backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + dropout(c_proj(gelu_tanh(c_fc(x))))."""
        if self.backend == "torch":
            h = F.gelu(self.c_fc(x), approximate="tanh")
            return residual + self.dropout(self.c_proj(h))
        # weights in x's dtype (under autocast x already is the autocast dtype)
        w1, b1, w2, b2 = (None if t is None else t.to(x.dtype) for t in
                          (self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias))
        if self.training and self.dropout.p > 0:  # dropout sits between the FFN and the residual
            return residual + self.dropout(fused_ffn(x, w1, b1, w2, b2, activation="gelu_tanh"))
        # the residual add happens in the second GEMM's epilogue
        return fused_ffn(x, w1, b1, w2, b2, activation="gelu_tanh", residual=residual)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache: Optional[KVCache] = None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return self.mlp(self.ln_2(x), residual=x)


class GPT(nn.Module):
    """GPT-2 (nanoGPT's model.py layout) with switchable attention / MLP backends.

    `model(idx, targets=None)` returns (logits, loss) as nanoGPT's: with targets, logits for
    every position [B, T, vocab] and the mean cross-entropy (targets == -1 ignored); without,
    logits of the last position only [B, 1, vocab] and loss None (``all_logits=True`` returns
    every position).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.cp: Optional[ContextParallel] = None  # set_context_parallel
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input / output embedding
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual projections scaled by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_context_parallel(self, group=None, mode: str = "ring", layout: str = "zigzag",
                             *, enabled: bool = True) -> "GPT":
        """Run every forward on a shard of the sequence across `group`'s ranks (None: the
        default group), or back on whole sequences with ``enabled=False``.

        Each rank then passes its shard of idx / targets [B, T / world] (``shard_sequence(x,
        dim=1, group=group, layout=layout)``); positions are the shard's global ones and the
        attention layers run ``ring_attention`` (mode "ring") or ``ulysses_attention``
        ("ulysses": n_head must be divisible by the group size). With targets the returned loss
        is this rank's cross-entropy sum times world / the group's token count: its mean over
        the group is the whole sequence's mean loss, and averaging the gradients over the
        group's ranks (DDP / FSDP over them do) gives the whole sequence's gradient. Without
        targets the logits of every local position are returned. No KV cache; dropout must be
        0 in training (attention dropout does not shard)."""
        cp = None
        if enabled:
            import torch.distributed as dist
            if mode not in CP_MODES:
                raise ValueError(f"mode must be one of {CP_MODES}, got {mode!r}")
            from ..distributed import _check_layout, _group_info
            _check_layout(layout)
            group, _, world = _group_info(group)
            if mode == "ulysses" and self.config.n_head % world:
                raise ValueError(f"ulysses context parallelism needs n_head ({self.config.n_head})"
                                 f" divisible by the group size {world}; use mode='ring'")
            cp = ContextParallel(group if group is not None else dist.group.WORLD, mode, layout)
        self.cp = cp
        for block in self.transformer.h:
            block.attn.cp = cp
        return self

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    # -----------------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                all_logits: bool = False, kv_cache: Optional[KVCache] = None):
        """idx [B, T] int64 token ids; targets [B, T] or None; kv_cache: keys/values of the
        positions before idx (used and extended; see `generate`)."""
        self._check_idx(idx, "idx")
        B, T = idx.shape
        if self.cp is not None:
            return self._forward_cp(idx, targets, kv_cache, self.cp)
        start = 0 if kv_cache is None else kv_cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} exceeds block_size "
                             f"{self.config.block_size}")
        if kv_cache is not None and start + T > kv_cache.capacity:
            raise ValueError(f"kv_cache holds {kv_cache.capacity} positions, needs {start + T}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.transformer.ln_f(x)
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got "
                                 f"{tuple(targets.shape)}")
            logits = self.lm_head(x)  # (B, T, vocab)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1)
            return logits, loss
        logits = self.lm_head(x if all_logits else x[:, [-1], :])  # (B, T or 1, vocab)
        return logits, None

    def _forward_cp(self, idx, targets, kv_cache, cp: ContextParallel):
        """forward on this rank's shard of the sequence (set_context_parallel)."""
        import torch.distributed as dist
        if kv_cache is not None:
            raise ValueError("a context-parallel GPT has no KV cache (generate on one process: "
                             "set_context_parallel(enabled=False))")
        B, n = idx.shape
        rank, world = cp.rank_world()
        if n * world > self.config.block_size:
            raise ValueError(f"sequence length {n * world} ({world} shards of {n}) exceeds "
                             f"block_size {self.config.block_size}")
        if cp.layout == "zigzag" and n % 2:
            raise ValueError(f"a zigzag shard holds two equal chunks: the local length must be "
                             f"even, got {n}")
        pos = cp.positions(n, idx.device)  # global positions of the shard's tokens
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, None, i)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, n, vocab)
        if targets is None:
            return logits, None
        if targets.shape != idx.shape:
            raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got "
                             f"{tuple(targets.shape)}")
        t = targets.reshape(-1)
        total = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), t, ignore_index=-1,
                                reduction="sum")
        count = (t != -1).sum().to(torch.float32)
        dist.all_reduce(count, group=cp.group)  # the group's token count (no gradient)
        return logits, total * world / count.clamp_min(1.0)

    def _check_idx(self, idx, name, check_ids: bool = False):
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be an int64 tensor [batch, seq], got "
                             + (f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, torch.Tensor)
                                else type(idx).__name__))
        if idx.shape[1] == 0:
            raise ValueError(f"{name} must hold at least one token per sequence")
        # the id range is read on the host: free for CPU tensors; for device tensors only in
        # generate (check_ids: once per call), not in every training step's forward (a sync)
        if (idx.numel() and (idx.device.type == "cpu" or check_ids)
                and not torch.compiler.is_compiling()):
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"{name} holds token ids in [{lo}, {hi}], outside the vocabulary "
                                 f"[0, {self.config.vocab_size})")

    # -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, use_cache: bool = True) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx [B, T]; returns [B, T + max_new_tokens].

        temperature 0 is greedy (argmax). top_k keeps the k most likely tokens before sampling.
        use_cache: keys and values of past positions are kept in a KVCache and each step runs
        one new token; with attn_backend "tritformer" the step's attention is
        `tritformer.decode_attention` (the cache is split across programs, flash-decoding).
        Without the cache every step reruns the whole context (nanoGPT's loop). Once the
        sequence outgrows block_size the context is the last block_size tokens, positions
        re-based, so a cache cannot be reused: those steps rerun the cropped context (the same
        computation as use_cache=False).
        """
        return torch.cat([idx] + [t for t in self.generate_stream(
            idx, max_new_tokens, temperature, top_k, use_cache)], dim=1)

    @torch.no_grad()
    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: Optional[int] = None, use_cache: bool = True) -> Iterator[torch.Tensor]:
        """`generate`, yielding each new token column [B, 1] as it is produced."""
        self._check_idx(idx, "idx", check_ids=True)
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"the prompt has {idx.shape[1]} tokens, longer than the model's "
                             f"context (block_size {self.config.block_size})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite float >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        block = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if use_cache and idx.shape[1] <= block:
                if cache is None:  # prefill: the whole prompt at once
                    dtype = next(self.parameters()).dtype
                    cache = KVCache(self.config, idx.shape[0], block, idx.device, dtype)
                    logits, _ = self(idx, kv_cache=cache)
                else:  # one new token against the cache
                    logits, _ = self(idx[:, -1:], kv_cache=cache)
            else:
                logits, _ = self(idx[:, -block:])
            logits = logits[:, -1, :].float()  # (B, vocab)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, nxt), dim=1)
            yield nxt

    # -----------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, model_or_path, *, attn_backend: str = "tritformer",
                mlp_backend: str = "tritformer", dropout: float = 0.0) -> "GPT":
        """GPT-2 weights from a transformers ``GPT2LMHeadModel`` / ``GPT2Model`` instance or a
        local directory (config.json plus model.safetensors or pytorch_model.bin, as written by
        ``save_pretrained``). Never downloads. The vocabulary is the checkpoint's (50257 for
        GPT-2, not padded)."""
        if isinstance(model_or_path, (str, os.PathLike)):
            hf_config, state = _read_hf_dir(os.fspath(model_or_path))
        elif isinstance(model_or_path, nn.Module) and hasattr(model_or_path, "config"):
            hf_config = model_or_path.config.to_dict()
            state = model_or_path.state_dict()
        else:
            raise TypeError("model_or_path must be a transformers GPT-2 model or a local directory "
                            f"path, got {type(model_or_path).__name__}")
        config = _gpt_config_from_hf(hf_config, attn_backend, mlp_backend, dropout)
        model = cls(config)
        model.load_state_dict(_convert_hf_state(state, config), strict=True)
        return model


# ---------------------------------------------------------------------------------------------
# GPT-2 checkpoints (transformers' layout)
# ---------------------------------------------------------------------------------------------
def _read_hf_dir(path: str) -> tuple[dict, dict]:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"GPT-2 directory {path!r} does not exist (from_hf reads local "
                                "directories only, never the network)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"GPT-2 directory {path!r} has no config.json")
    with open(cfg_path, encoding="utf-8") as f:
        hf_config = json.load(f)
    st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file
        state = load_file(st)
    elif os.path.isfile(pt):
        state = torch.load(pt, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"GPT-2 directory {path!r} is missing its weights: expected "
                                "model.safetensors or pytorch_model.bin (sharded checkpoints are "
                                "not supported)")
    return hf_config, state


def _gpt_config_from_hf(c: dict, attn_backend: str, mlp_backend: str, dropout: float) -> GPTConfig:
    model_type = c.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"from_hf loads GPT-2 checkpoints, got model_type {model_type!r}")
    act = c.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"from_hf: activation_function {act!r} is not GPT-2's tanh GELU")
    for key, want in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                      ("scale_attn_weights", True)):
        if c.get(key, want) != want:
            raise ValueError(f"from_hf: {key}={c[key]!r} is not supported (GPT-2 uses {want})")
    eps = c.get("layer_norm_epsilon", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise ValueError(f"from_hf: layer_norm_epsilon {eps} is not supported (GPT-2 uses 1e-5)")
    n_inner = c.get("n_inner")
    if n_inner is not None and n_inner != 4 * c["n_embd"]:
        raise ValueError(f"from_hf: n_inner {n_inner} != 4 * n_embd is not supported")
    return GPTConfig(block_size=c.get("n_positions", c.get("n_ctx", 1024)),
                     vocab_size=c["vocab_size"], n_layer=c["n_layer"], n_head=c["n_head"],
                     n_embd=c["n_embd"], dropout=dropout, bias=True, attn_backend=attn_backend,
                     mlp_backend=mlp_backend)


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _convert_hf_state(state: dict, config: GPTConfig) -> dict:
    """transformers' GPT-2 state_dict -> ours: `transformer.` prefix, Conv1D [in, out] weights
    transposed to nn.Linear's [out, in], causal-mask buffers dropped, lm_head tied."""
    out = {}
    for key, t in state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old checkpoints store the causal mask as a buffer
        if key == "lm_head.weight":
            continue  # tied to wte
        name = key if key.startswith("transformer.") else "transformer." + key
        if name.endswith(_CONV1D):
            t = t.t()
        out[name] = t.float() if t.is_floating_point() else t
    if "transformer.wte.weight" not in out:
        raise ValueError("GPT-2 weights have no wte.weight (token embedding): not a GPT-2 checkpoint")
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out
