"""The op registry: what the tooling (`validate`, `inspect`, `bench`, the CLI) knows about each op,
declared once.

Each `Op` names, for the tools that cover it:
- `validate`: its cases (one line per code path; the tuple format is the run function's), how
  many `--quick` keeps, the function that builds a case's inputs and runs the check
  (`tritformer.testing.cases`), and the `tritformer.testing` check functions it calls;
- `inspect`: its launch-plan builder (`tritformer.inspect`), the kernel-name tag of its rows and
  the plan cases it compiles (sizes of the D/C column, causal, heads);
- `bench`: its sweep function (`tritformer.bench.<op>`) and the `inspect` ops of the kernels it
  runs (`bench --inspect`).

Declarative and lazy: functions are named as "module:attribute" strings and imported on use
(`resolve`), so importing this module imports no kernel, no benchmark and no torch. Tools iterate
`OPS` in order; the order is the report order of every tool (and sets validate's seeds).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Optional


def resolve(ref: str) -> Any:
    """The object a "package.module:attr" reference names (imported now)."""
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclasses.dataclass(frozen=True)
class Validate:
    """`python -m tritformer validate`: run(case, dtype name, device, generator, seed) ->
    (case name, [numerics.Check]); `seed` is the case's index in the grid (its generator's seed)."""
    cases: tuple
    quick: int                   # --quick: the first `quick` cases
    run: str                     # "module:function"
    checks: tuple = ()           # the tritformer.testing check functions run calls

    def selected(self, quick: bool) -> tuple:
        return self.cases[:self.quick] if quick else self.cases


@dataclasses.dataclass(frozen=True)
class Inspect:
    """`python -m tritformer inspect`: plans(arch, dtype, D/C, causal, heads) -> [Launch]."""
    plans: str                       # "module:function"
    tag: str = ""                    # appended to the kernel names of its rows
    sizes: Optional[tuple] = None    # the D/C column; None: the --head-dim buckets
    causal: Optional[tuple] = None   # None: both (False, True)
    heads: tuple = ("-",)            # mha / gqa4 / gqa8; "-" where heads do not apply

    def cases(self, op: str, arch: str, dtype: str, head_dims, causal) -> list[tuple]:
        """(op, arch, dtype, D/C, causal, heads) plan cases, in report order."""
        return [(op, arch, dtype, s, c, h) for s in (self.sizes or head_dims)
                for c in (self.causal or causal) for h in self.heads]


@dataclasses.dataclass(frozen=True)
class Bench:
    """`python -m tritformer bench`: run(device, quick, providers, emit, progress, skipped,
    **kwargs) appends its rows through emit."""
    run: str                     # "module:function"
    kwargs: tuple = ()           # extra keyword arguments of run, as (name, value) pairs
    kernels: tuple = ()          # the inspect ops of the kernels it runs (bench --inspect)


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    validate: Optional[Validate] = None
    inspect: Optional[Inspect] = None
    bench: Optional[Bench] = None


_CASES = "tritformer.testing.cases"
_PLANS = "tritformer.inspect"
SOFTMAX_ROWS = (1024, 16384, 65536)  # inspect: one 4-warp tile, the largest single tile, multi-tile

OPS = (
    Op("attention",
       validate=Validate(
           # (B, Hq, Hkv, Nq, Nk, D, causal): one line per code path
           cases=((2, 4, 4, 128, 128, 64, False),   # MHA, square, full tiles
                  (2, 4, 4, 128, 128, 64, True),    # causal diagonal tiles
                  (1, 4, 2, 100, 157, 59, True),    # GQA, odd D, Nq < Nk (KV-cache alignment)
                  (1, 4, 1, 200, 77, 128, True),    # MQA, Nq > Nk: rows with no visible key
                  (1, 2, 2, 1, 300, 96, False),     # single query against a long cache
                  (1, 2, 2, 33, 1, 40, False),      # single key
                  (1, 1, 1, 65, 65, 256, True)),    # largest head dim
           quick=3, run=f"{_CASES}:run_attention", checks=("check_attention",)),
       inspect=Inspect(f"{_PLANS}:_attention_plans", heads=("mha", "gqa4")),
       bench=Bench("tritformer.bench.attention:bench_attention", kernels=("attention",))),
    Op("masked",
       validate=Validate(
           # (B, Hq, Hkv, Nq, Nk, D, causal, options): one line per code path of the option
           # switches ("mask=bool:1,1,Nq,Nk" is a mask of that broadcast shape)
           cases=((2, 4, 2, 100, 130, 64, False, "mask=bool:B,1,Nq,Nk"),      # bool mask + GQA, masked rows
                  (1, 4, 4, 96, 96, 48, False, "mask=float_grad:1,Hq,Nq,Nk"),  # additive mask with -inf, dmask
                  (2, 2, 2, 80, 150, 64, True, "kpm"),                  # key padding (one batch all padding) + causal
                  (1, 4, 4, 128, 160, 64, False, "window=40,8 alibi"),  # sliding window + ALiBi, skipped tiles
                  (2, 2, 1, 90, 90, 64, True, "softcap=20"),            # softcap (tanh) + MQA
                  (1, 2, 2, 100, 100, 64, False, "dropout=0.2")),       # Philox dropout, fwd and bwd
           quick=2, run=f"{_CASES}:run_masked", checks=("check_attention",)),
       # the heaviest masked variant: every mask/bias/dropout switch on
       inspect=Inspect(f"{_PLANS}:_masked_plans", tag="+masked", heads=("mha",)),
       bench=Bench("tritformer.bench.masked:bench_masked", kernels=("masked",))),
    Op("varlen",
       validate=Validate(
           # (Hq, Hkv, seqlens_q, seqlens_k, D, causal, options): packed sequences incl. empty ones
           cases=((4, 2, (37, 0, 90, 5), (60, 0, 90, 1), 64, True, ""),          # GQA, causal, 0-length seq
                  (2, 2, (100, 17), (100, 40), 48, False, "window=32,0 alibi softcap=15"),
                  (2, 1, (50, 0, 70), (70, 20, 33), 64, False, "dropout=0.15")),  # queries without keys, dropout
           quick=1, run=f"{_CASES}:run_varlen", checks=("check_varlen_attention",)),
       inspect=Inspect(f"{_PLANS}:_varlen_plans", tag="+varlen", heads=("mha", "gqa4")),
       bench=Bench("tritformer.bench.varlen:bench_varlen", kernels=("varlen",))),
    Op("softmax",
       validate=Validate(
           # (x shape, bool mask shape or None, causal, scale): one line per code path
           cases=(((4, 8, 64, 64), (1, 8, 64, 64), True, 0.125),  # attention-score shape: mask + causal
                  ((16, 1000), None, False, 1.0),                 # padded single tile
                  ((2, 70_000), (70_000,), False, 2.0),           # multi-tile online path, broadcast mask
                  ((3, 1), None, False, 1.0)),                    # one element per row
           quick=2, run=f"{_CASES}:run_softmax", checks=("check_softmax",)),
       inspect=Inspect(f"{_PLANS}:_softmax_plans", sizes=SOFTMAX_ROWS),
       bench=Bench("tritformer.bench.softmax:bench_softmax", kernels=("softmax",))),
    Op("ffn",
       validate=Validate(
           # (gated, M, in, hidden, out, activation, extra): one line per code path; the gated
           # lines check gated_ffn (one grid with ffn's, as the validate report has always run)
           cases=((False, 100, 96, 200, 96, "gelu", "residual"),    # ragged tiles, residual epilogue
                  (True, 64, 64, 160, 64, "silu", ""),              # SwiGLU: dual-accumulator kernel
                  (False, 1, 40, 70, 33, "gelu_tanh", "recompute"),  # M = 1, recomputed activations
                  (True, 33, 48, 80, 48, "gelu", "recompute"),      # GeGLU, recompute
                  (False, 50, 64, 128, 64, "relu", "")),
           quick=2, run=f"{_CASES}:run_ffn", checks=("check_ffn", "check_gated_ffn")),
       # every GEMM variant the FFN ops launch (gated ones included): model dim 1024, not causal
       inspect=Inspect(f"{_PLANS}:_ffn_plans", sizes=(1024,), causal=(False,)),
       bench=Bench("tritformer.bench.ffn:bench_ffn", kwargs=(("gated", False),),
                   kernels=("ffn",))),
    Op("gated_ffn",  # validated and inspected with ffn
       bench=Bench("tritformer.bench.ffn:bench_ffn", kwargs=(("gated", True),),
                   kernels=("ffn",))),
    Op("decode",
       validate=Validate(
           # (B, Hq, Hkv, Nq, Nmax, lengths, D, num_splits): one line per code path
           cases=((2, 8, 2, 1, 300, (300, 123), 64, None),  # GQA 4:1 group tile, ragged lengths, default splits
                  (1, 4, 4, 4, 257, (200,), 128, 5),        # MHA, Nq = 4 causal rows, 5 splits
                  (3, 8, 1, 1, 64, (0, 1, 64), 40, 3)),     # MQA, empty and single-key caches, odd D
           quick=1, run=f"{_CASES}:run_decode", checks=("check_decode_attention",)),
       # causal by construction (Nq > 1: the last Nq positions), GQA 8:1
       inspect=Inspect(f"{_PLANS}:_decode_plans", causal=(True,), heads=("gqa8",)),
       bench=Bench("tritformer.bench.decode:bench_decode", kernels=("decode",))),
    Op("kvcache",  # kvcache_append: the append + rotary launch before decode (#19)
       inspect=Inspect(f"{_PLANS}:_kvcache_plans", causal=(False,))),
    Op("gpt",  # the reference GPT end to end: bench only (its kernels are the ops above)
       bench=Bench("tritformer.bench.gpt:bench_gpt", kernels=("attention", "decode", "ffn"))),
    Op("ring",  # context-parallel attention (tritformer.distributed) on Gloo: bench only
       bench=Bench("tritformer.bench.ring:bench_ring", kernels=("attention",))),
)

REGISTRY = {op.name: op for op in OPS}


def get(name: str) -> Op:
    return REGISTRY[name]


def names(tool: str) -> tuple[str, ...]:
    """The ops `tool` ("validate", "inspect" or "bench") covers, in registry order."""
    return tuple(op.name for op in OPS if getattr(op, tool) is not None)
