"""Tile configs of the attention kernels: the interpreter's, and the GPU candidates per variant,
kernel, architecture family, head-dim bucket and element size, written as compact tables.

A cell `BMxBN/W/S` is a config: BLOCK_M x BLOCK_N tile, W warps, S pipeline stages; with two
in a cell the autotuner picks on the device. For dK/dV, BLOCK_M is the streamed query tile and
BLOCK_N the resident key tile; for dQ the reverse. Columns: the kernel's BLOCK_D bucket
(next power of two of the head dim, at least 16). Rows: kernel, compute-capability family
(kernels._launch.arch_family), element size (16b: fp16/bf16, fp32).

Provenance: every GPU cell was chosen from an AOT sweep of the cubins Triton builds
(`python -m tritformer inspect`, Triton 3.9, confirmed on 3.7.1 where noted; causal; MHA and GQA
4:1 plans; the `varlen` and `masked` plans for their tables). All are spill-free and within
shared memory; the notes next to a table say what was rejected and why.
"""
from __future__ import annotations

import contextlib

import triton

from .._launch import arch_family


def _cfg(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n},
                         num_warps=num_warps, num_stages=num_stages)


# Interpreter tiles: BLOCK_M != BLOCK_N on purpose, so the tests exercise the general diagonal
# logic; small enough that the test sequence lengths (17..257) span several tiles.
INTERPRETER_CONFIGS = {
    "fwd": _cfg(64, 32, 4, 1),
    "bwd_dkdv": _cfg(32, 64, 4, 1),  # BLOCK_M: streamed query tile, BLOCK_N: resident key tile
    "bwd_fused": _cfg(32, 64, 4, 1),  # dK/dV with dQ's atomics (FUSED_DQ): as bwd_dkdv
    "bwd_dq": _cfg(64, 32, 4, 1),    # BLOCK_M: resident query tile, BLOCK_N: streamed key tile
}
PREPROCESS_BLOCK_M = 64

HEAD_DIM_BUCKETS = (64, 128, 256)

# Dense attention, causal or not. E.g. fwd D=128 fp16 sm_90 128x64/8/3: 232 regs, 128 KB smem,
# wgmma; 128x64/4 warps spilled 1240 B, so 4-warp 128-row tiles are not shipped at D >= 128.
# fwd sm_90 D<=128 16b: 128x128/8/3 spilled 16 B (causal, 255 regs) on 3.7.1 and 3.9; 64x64/4/3:
#   255 regs, 0 B on both. D<=256: 64x32/4/2 spilled 8 B (255 regs) and 128x64/8/2 64 B on 3.9
#   (causal MHA; serialized est. 0.55 / 0.65); 64x16/4/2 (234-238 regs, est. 0.43-0.45) and
#   64x32/8/2 (171-192 regs, est. 0.48-0.53 at replication 1.5) are clean on 3.9 and 3.7.1,
#   causal and not, MHA and GQA 4:1.
# fwd sm_80 D<=128 16b: 128x64/8/3 spilled 48 B once the kernel took masks/varlen (causal);
#   128x32/8/3: 189 regs. D<=256: 64x32/4 spilled 136 B on 3.7.1 (causal); 8 warps: 222 regs.
# bwd_dkdv sm_90, GQA 4:1 causal: 64x128/8 spilled 80 B at D=64 (64x64/8: 241 regs, 0 B) and
#   32x64/8 24 B at D=128 (16x64/8: 222 regs; 16x128/8: 251 regs). sm_80, GQA 4:1: 32x64/4
#   (D=64) and 64x64/8 (D=128) spilled.
# bwd_dq sm_90 D<=256 16b: 64x16/4 spilled 16-40 B on 3.7.1; 64x32/8: 206 regs. sm_80 D<=128:
#   128x32/8 spilled 12 B (255 regs) on 3.7.1, causal.
# bwd_dkdv sm_90 D=256 16b stays mma.sync (16x32/4/1: 241 regs, 0 B, est. 0.58): wgmma needs a
#   64-row key tile per warpgroup, and the two fp32 [BLOCK_N, 256] accumulators (dK, dV) then
#   take 128 regs/thread on 8 warps before k, v and the scores. Tried (causal MHA, regs / spill B,
#   Triton 3.9 | 3.7.1): 16x64/8/2 255/280 | 254/0 (est. 0.35 | 0.42); 16x64/8/1 255/1076 |
#   255/1876; 32x64/8/1 255/1444 | 255/1412; 64x64/8/1 255/2340 | 255/1968; 16x64/4/1 255/5656;
#   16x128/8/1 255/5632; 16 warps (128-reg cap) 16x64/16/1 1956, 32x128/16/1 4236. None is clean
#   on both versions, and the one clean on 3.7.1 estimates below the shipped mma.sync tile.
# fp32 at D <= 128 (plain, varlen) computes its dots in 3xTF32 on tensor cores
#   (options._dot_precision), in these tiles from an AOT sweep of the tf32x3 kernels (513
#   compiles, Triton 3.9 and 3.7.1, causal MHA and GQA 4:1, sm_80 and sm_90): spill-free, no
#   ptxas warning, mma.sync. E.g. fwd 16x64/8/1: 207-211 regs; dkdv 32x16/8/1: 202-254; dq
#   16x64/8/1: 251-253. Rejected: every 64/128-row fwd tile on sm_80 (376 B+), fwd 32x32/8 (32 B
#   on 3.7.1), dkdv 16x32/8 (40-144 B), dq 32x32/8 (28-116 B). fp32 at D = 256 (and masked fp32
#   at D > 64) keeps exact fp32 FMA dots: no tf32x3 backward tile was spill-free (best dkdv
#   16x16/8: 464 B sm_80, 996 B sm_90; masked D=128 dkdv 8-96 B). FMA tiles: 8 warps, e.g.
#   bwd_dkdv D=256 sm_80 32x16/8: 128 regs, 0 spill; 4 warps spilled 2.4 KB.
# fp32 at BLOCK_D 32..64 computes its scores and dP exact (options._attn_dot_precision,
#   "exact_scores": _math.dot_f32_exact, six tf32 MMAs per score tile; P @ V and the gradient
#   dots stay 3xTF32), in the D <= 64 fp32 cells of every table (plain, varlen and paged,
#   light, dropout, masked) from an AOT sweep with it (2026-12-07; BLOCK_D 64, Triton 3.9 and
#   3.7.1, sm_80 and sm_90, causal and not, MHA and GQA 4:1; sm_86 / sm_120 take sm_80's cells,
#   within 99 KB). Rejected, spilled (Triton 3.9): sm_80 fwd 64x32/4/2 692-728 B (plain),
#   804-812 B (varlen), 128x32/8/3 956-1012 B (varlen), 64x32/8/2 684 B, masked 32x32/8/1 228
#   B; dK/dV 16x32/4/1 40-56 B (plain GQA, light), sm_90 12-68 B (plain MHA, light GQA 228 B),
#   16x32/8/1 8-192 B (varlen / dropout GQA, masked), sm_90 32x32/8/1 60-256 B (varlen,
#   masked, dropout), masked sm_90 32x16/8/1 12 B (GQA); dQ sm_80 32x16/4/1 8 B (varlen GQA
#   causal), 264 B (light), 64x16/4/2 1272-1320 B (varlen), masked 32x16/8/1 20 B, sm_90
#   masked 16x16/8/1 28 B, 16x32/8/1 32-44 B, 32x16/8/1 192 B, dropout 32x32/8/1 8 B;
#   sm_90 varlen dQ 128x32/8/2 needs 237,568 B of shared memory (over 227 KB); masked sm_80
#   dK/dV 32x16/8/1 12 B on 3.7.1 (GQA). Open: the masked sm_90 dQ has no tile clean on both
#   versions with exact scores (every switch on): 16x32/4/1 ships, 0 B on Triton 3.7.1 (what
#   torch 2.13's CUDA build installs) and 8 B on 3.9 (MHA; GQA 0 B); 16x16/4/1 0 B on 3.9,
#   12 B on 3.7.1 (GQA); 16x16/2/1 44 B (3.9), 16x64/8/1 8-32 B (3.9), 16x16/8/1 28 B,
#   16x32/8/1 32-44 B, 32x16/4/1 280-652 B, 32x32/4/1 732-1140 B, 16x32/2/1 and 16x16/1/1
#   1.1-2.2 KB.
# fp32 at BLOCK_D 128 computes its scores and dP exact too (2026-12-07, every variant; before:
#   3xTF32 in plain / varlen, the FMA chain in the masked tables), with the exact dot's operands
#   loaded in 16-wide slices of D (_math.dot_f32_exact_sliced; the dK/dV kernel's K / V slices
#   volatile, so that they are not hoisted: hoisted into the GQA head loop they took 106,496 B of
#   shared memory at 16x16/8/1, over sm_86's / sm_120's 99 KB). At full width every backward
#   tile spilled (Triton 3.9: dK/dV 16x16/8/1 8-84 B, dQ 16x16/8/1 20-28 B, masked dK/dV 896 B).
#   Slices of 16 against 32 (sm_90, causal and not, MHA and GQA 4:1, Triton 3.9): plain dQ
#   16x16/8/1 0 B on all four (32: 16 B non-causal MHA), masked dK/dV 108 B (204 B), light dQ 0
#   (24 B). The D <= 128 fp32 cells of every table, swept at 16x16, 16x32, 32x16, 16x64, 32x32
#   (8 warps, 1 stage), then the shipped cells compiled (`inspect --op attention masked varlen
#   --head-dim 128 --dtype fp32`, sm_80 / sm_90 / sm_86 / sm_120, causal and not, MHA and GQA
#   4:1; the masked family MHA, as inspect plans it; Triton 3.9). Plain: spill-free everywhere
#   (fwd 16x64/8/1 and 16x32/8/1; dK/dV 16x16/8/1; dQ 16x64 and 16x16 on sm_80 / sm_86, 16x16
#   and 32x16 on sm_90, 16x64 on sm_120, where 16x16 spilled 24 B with GQA causal). Rejected:
#   dK/dV 32x16/8/1 8 B (sm_80 / sm_86 GQA) and 24-124 B (sm_120), 16x32/8/1 380-790 B, 16x64
#   2.3 KB and up; dQ sm_90 16x64/8/1 12 B (slices of 32); masked fwd 32x32/8/1 650-750 B.
#   Open, no tile tried is clean, the least spilling ships: varlen dK/dV 16x16/8/1
#   40-112 B (sm_80 / sm_86 / sm_90), the masked table's (every switch) dK/dV 16x16/8/1 96 B
#   (sm_90), 140 B (sm_120) and dQ 16x32/8/1 52 B (sm_90), 96 B (sm_120), light dK/dV
#   16x16/8/1 64-72 B (sm_90 / sm_120) and dQ 84-96 B (sm_120), dropout dK/dV 16x16/8/1 28-76 B (sm_90 /
#   sm_120) and dQ 8-16 B (sm_120); sm_80's masked, light and dropout cells are clean. fp32 is
#   not a speed path (FlashAttention has none): these spills are the cost of fp32 results within
#   the criterion at D 65..128, where the faster dots failed it (tests/test_fuzz.py). On Triton
#   3.7.1 (`inspect --op attention masked varlen --arch sm_80 sm_90 --head-dim 128 --dtype fp32`,
#   2026-12-07: 128 rows, 13 min with 2 jobs) 122 compile clean and 6 spill, where ptxas held
#   the dK/dV kernel to 128 registers (3.9 gives it up to 255): plain dK/dV sm_80 GQA 4:1
#   non-causal 16x16/8/1 176 B (causal: 255 regs, 0 B), varlen dK/dV 16x16/8/1 248 B (sm_80
#   GQA causal), 32-36 B (sm_90), masked dK/dV sm_90 12 B (255 regs), masked dQ sm_80 16x32/8/1
#   140 B. No smaller tile exists (16x16 is the dot's minimum); the fix would be in the kernel's
#   live ranges on that version, left open with the 3.9 ones above.
# 2026-12-08, the exact scores' slices compensated (TwoSum; _math.dot_f32_exact_sliced) in the
#   forward, decode and the dK/dV kernel's scores; the dQ kernel and dP keep the single chain
#   (compensated, plain sm_90 dQ 32x16/8/1 spilled 16-260 B and dK/dV sm_80 GQA 192 B on 3.9).
#   Same command plus decode, A/B against 96197d8: Triton 3.9 sm_80 / sm_90, 142 rows: 10
#   failing before and 10 after, the same cells (masked dK/dV sm_90 108 -> 100 B, light dK/dV
#   64 -> 48, varlen dK/dV 80-112 -> 48-104, the rest equal), once the varlen sm_80 and light
#   sm_90 forwards and decode's sm_80 16-row fp32 entry took the tiles noted at their tables.
#   sm_86 / sm_120 (3.9): 10 failing, all in the list above (masked dQ sm_120 144 B and dropout
#   dQ 24 B measured equal at 96197d8). Triton 3.7.1 sm_80 / sm_90 (135 rows): 4 failing where
#   6 were: the varlen and masked dK/dV rows are clean now; plain dK/dV GQA 4:1 16x16/8/1 spills
#   192 B on sm_80 (176 B before) and, new, 244-300 B on sm_90 (128 regs, ptxas's choice);
#   masked dQ sm_80 152 B as before. Kept: a consistent P (the dK/dV kernel's scores equal the
#   forward's, which set lse) is what its dV needs: uncompensated there, dV measured 10.6x
#   PyTorch's error (D = 100, scale 1.84, one query over 77 keys).
# Backward (#17; AOT, `inspect --perf`, Triton 3.9 | 3.7.1, GQA 4:1 causal unless noted):
# - replication 1.0 everywhere at D <= 128 16-bit: dropped dK/dV sm_90 64x64/8/2 (D=64) and
#   16x64/8/2 (D=128), sm_80 32x64/8/2 (D=128), all 1.5 (8 warps on a 64-row first operand:
#   both warpgroups / warp pairs compute the same product); dQ sm_90 D=128 64x64/8/2 (1.67) is
#   now 128x64/8/2 (210 regs, est. 0.69). One-stage candidates on sm_90 (dK/dV 32x128/8/1 at
#   D=64: 186 regs, est. 0.53 vs 0.48 two-stage; 16x128/8/1 at D=128: 249 regs, 0.58 vs 0.53;
#   dQ 128x64/8/1 at D=64: 0.60 vs 0.57) drop the cp.async prefetch from the loop, whose latency
#   the model does not see, so the two-stage tiles stay and the autotuner picks.
# - dK/dV query tiles of 32+ rows where they fit; 64 rows do not: sm_90 D=64 64x64/4/2 80 B,
#   64x64/4/1 40 B, 64x128/8/1 40 B; D=128 32x128/8/1 168 B, 32x64/4/1 192 B, 16x64/4/1 72 B;
#   sm_80 D=128 32x128/8/1 76 B, 32x64/4/2 348 B (spilled).
# - bwd_fused (deterministic=False: the dK/dV kernel with FUSED_DQ, dS K atomically added to an
#   fp32 dQ): sm_90 D=64 32x128/8/1 (243 | 227 regs, 0 B; 32x128/8/2 239 regs, est. 0.47 vs
#   0.51); sm_80 D=64 16x64/4/1 (254 regs on both; 16x64/4/2 12 B on 3.7.1 GQA not causal,
#   32x64/4/1 72-104 B on 3.9, 16x128/8/x 0-8 B but replication 1.2). At D=128 every tile tried
#   spilled, so "-" (the deterministic kernels run; sm_90 since the unmasked query loop: GQA 4:1
#   still spills, MHA does not, see TMA_BWD's note). Before it: sm_90 16x128/8/1 352-368 B,
#   16x128/8/2 328, 32x128/8/1 532-556, 16x64/4/x 612-780, 32x64/4/x 924-1092, 64x128/8/x 956-1756,
#   64x64/4/x 2.1-2.8 KB; sm_80 16x128/8/1 12 B, 32x128/8/1 172, 16x128/8/2 448, 32x64/8/2 724
#   (repl. 1.8), 64x64/4/2 2.8 KB. The dS K product itself costs the registers (a plain store in
#   place of the atomics: 416 B vs 448 B, sm_80 16x128/8/2; unmasked atomics 448 B; K^T loaded as
#   its own operand or dQ formed before dK: no change). fp32, the other architectures and the
#   varlen / light / masked tables have no bwd_fused row: the deterministic kernels run.
_PLAIN = """
# kernel  sm  elem | D <= 64                | D <= 128               | D <= 256
fwd       90  16b  | 128x64/8/3 128x128/8/3 | 128x64/8/3 64x64/4/3   | 64x16/4/2 64x32/8/2
fwd       90  fp32 | 64x32/4/2              | 16x64/8/1 16x32/8/1    | 32x16/8/1 16x32/8/1
fwd       80  16b  | 128x64/8/3 64x64/4/3   | 128x32/8/3 64x64/4/3   | 64x32/8/2 32x32/4/2
fwd       80  fp32 | 32x64/8/2 16x64/4/2    | 16x64/8/1 16x32/8/1    | 32x16/8/1 16x32/8/1
bwd_dkdv  90  16b  | 32x128/8/2 32x128/8/1  | 16x128/8/2 16x128/8/1  | 16x32/4/1
bwd_dkdv  90  fp32 | 32x16/8/1 32x16/4/1    | 16x16/8/1              | 16x32/8/1 16x16/8/1
bwd_dkdv  80  16b  | 32x128/8/2 16x128/8/2  | 16x128/8/2             | 16x32/4/1
bwd_dkdv  80  fp32 | 32x16/8/1 32x16/4/1    | 16x16/8/1              | 32x16/8/1 16x16/8/1
bwd_fused 90  16b  | 32x128/8/1             | -                      | -
bwd_fused 90  fp32 | -                      | -                      | -
bwd_fused 80  16b  | 16x64/4/1              | -                      | -
bwd_fused 80  fp32 | -                      | -                      | -
bwd_dq    90  16b  | 128x64/8/2 128x64/8/1 128x32/8/2 | 128x64/8/2 128x32/8/2 | 128x32/8/2 64x32/8/2
bwd_dq    90  fp32 | 64x16/4/2              | 16x16/8/1 32x16/8/1    | 32x32/8/1 16x32/8/1
bwd_dq    80  16b  | 128x32/8/2 64x32/4/2   | 64x64/8/2 64x32/4/2    | 64x64/8/2 32x32/4/2
bwd_dq    80  fp32 | 32x16/4/1              | 16x64/8/1 16x16/8/1    | 32x16/8/1 16x32/8/1
# sm_86/sm_89 and sm_120 (99 KB): sm_80's cells where they fit and (sm_86, 16b D<=128, inspect)
#   do not spill; sm_86 spilled 8-16 B with fwd 64x64/4/3 (D=64 causal), 128x32/8/3 (D=128 GQA)
#   and dq 64x32/4/2 (D=64); dq D=256 64x64/8/2 needs 135,168 B (tests/data/config_smem.json)
fwd       86  16b  | 128x64/8/3 64x64/8/3   | 128x32/8/2 64x64/4/3   | 64x32/8/2 32x32/4/2
fwd       86  fp32 | 32x64/8/2 16x64/4/2    | 16x64/8/1 16x32/8/1    | 32x16/8/1 16x32/8/1
bwd_dkdv  86  16b  | 32x128/8/2 16x128/8/2  | 16x128/8/2 32x64/8/2   | 16x32/4/1
bwd_dkdv  86  fp32 | 32x16/8/1 32x16/4/1    | 16x16/8/1              | 32x16/8/1 16x16/8/1
bwd_dq    86  16b  | 128x32/8/2 64x32/8/2   | 64x64/8/2 64x32/4/2    | 32x32/4/2
bwd_dq    86  fp32 | 32x16/4/1              | 16x64/8/1 16x16/8/1    | 32x16/8/1 16x32/8/1
fwd       120 16b  | 128x64/8/3 64x64/4/3   | 128x32/8/3 64x64/4/3   | 64x32/8/2 32x32/4/2
fwd       120 fp32 | 32x64/8/2 16x64/4/2    | 16x64/8/1 16x32/8/1    | 32x16/8/1 16x32/8/1
bwd_dkdv  120 16b  | 32x128/8/2 16x128/8/2  | 16x128/8/2 32x64/8/2   | 16x32/4/1
bwd_dkdv  120 fp32 | 32x16/8/1 32x16/4/1    | 16x16/8/1              | 32x16/8/1 16x16/8/1
bwd_dq    120 16b  | 128x32/8/2 64x32/4/2   | 64x64/8/2 64x32/4/2    | 32x32/4/2
bwd_dq    120 fp32 | 32x16/4/1              | 16x64/8/1              | 32x16/8/1 16x32/8/1
"""

# Packed sequences (the `inspect --op varlen` plans): for each cell, the first two spill-free
# configs within shared memory, trying the plain GQA table's configs first, then 32x32/8,
# 32x16/8, 16x32/8, 16x16/8. The plain tiles mostly survive; dK/dV at D=128 needs smaller ones
# (sm_90 fp16 32x128/8 spilled 332 B). dK/dV on 3.7.1: sm_90 D=128 32x16/8 spilled 24 B (80
# regs), sm_80 D=128 16x128/8 136 B (causal); 32x32/8 and 16x64/8 are spill-free on 3.7.1 and
# 3.9; GQA 4:1 causal D=64 32x32/8/1: 128 regs + 32 B spilled on both (16x64/8/1: 138 regs).
# sm_80 dK/dV D=64 16x128/8/2 spilled 16 B (255 regs, GQA 4:1, causal and not, Triton 3.7.1)
# once the unbounded query loop lost its row mask (#17); 16x128/8/1: 169-208 regs, 0 B on both
# versions, est. 0.658-0.668 (16x128/8/2 0.70-0.71 on 3.9). sm_86 / sm_120 follow sm_80.
# fwd sm_80 fp32 D<=128: 16x64/8/1 alone since the compensated exact scores (2026-12-08,
# _math.dot_f32_exact_sliced): 16x32/8/1 causal MHA went to 128 regs + 8 B (Triton 3.9; it had
# 212 regs, 0 B), 16x64/8/1 193-202 regs, 0 B.
_VARLEN = """
# kernel  sm  elem | D <= 64                | D <= 128               | D <= 256
fwd       90  16b  | 128x64/8/3 128x128/8/3 | 128x64/8/3 64x64/4/3   | 64x32/4/2 64x32/8/2
fwd       90  fp32 | 64x32/4/2 128x32/8/3   | 16x64/8/1 16x32/8/1    | 32x16/8/1 16x32/8/1
fwd       80  16b  | 128x64/8/3 128x32/8/3  | 128x32/8/3 64x64/4/3   | 64x32/8/2 32x32/4/2
fwd       80  fp32 | 32x64/8/2 16x64/4/2    | 16x64/8/1              | 32x16/8/1 16x32/8/1
bwd_dkdv  90  16b  | 32x128/8/2 16x64/8/1   | 32x32/8/1 16x64/8/1    | 16x32/4/1 32x32/8/1
bwd_dkdv  90  fp32 | 32x16/8/1 16x16/8/1    | 16x16/8/1              | 16x32/8/1 16x16/8/1
bwd_dkdv  80  16b  | 16x128/8/1 32x32/8/1   | 32x32/8/1 16x64/8/1    | 16x32/4/1 32x32/8/1
bwd_dkdv  80  fp32 | 32x16/8/1 16x16/8/1    | 16x16/8/1              | 16x32/8/1 16x16/8/1
bwd_dq    90  16b  | 128x32/8/2 128x64/8/2  | 128x32/8/2 64x64/8/2   | 128x32/8/2 32x32/8/1
bwd_dq    90  fp32 | 64x16/4/2              | 16x16/8/1              | 16x32/8/1 16x16/8/1
bwd_dq    80  16b  | 128x32/8/2 64x32/4/2   | 64x64/8/2 64x32/4/2    | 64x64/8/2 32x32/4/2
bwd_dq    80  fp32 | 16x16/4/1 32x16/8/1    | 16x64/8/1 16x16/8/1    | 16x32/8/1 32x32/8/1
fwd       86  16b  | 128x64/8/3 128x32/8/3  | 128x32/8/3 64x64/4/3   | 64x32/8/2 32x32/4/2
fwd       86  fp32 | 32x64/8/2 16x64/4/2    | 16x64/8/1 16x32/8/1    | 32x16/8/1 16x32/8/1
bwd_dkdv  86  16b  | 16x128/8/1 32x32/8/1   | 32x32/8/1 16x64/8/1    | 16x32/4/1 32x32/8/1
bwd_dkdv  86  fp32 | 32x16/8/1 16x16/8/1    | 16x16/8/1              | 16x32/8/1 16x16/8/1
bwd_dq    86  16b  | 128x32/8/2 64x32/4/2   | 64x64/8/2 64x32/4/2    | 32x32/4/2
bwd_dq    86  fp32 | 16x16/4/1 32x16/8/1    | 16x64/8/1 16x16/8/1    | 16x32/8/1
fwd       120 16b  | 128x64/8/3 128x32/8/3  | 128x32/8/3 64x64/4/3   | 64x32/8/2 32x32/4/2
fwd       120 fp32 | 32x64/8/2 16x64/4/2    | 16x64/8/1 16x32/8/1    | 32x16/8/1 16x32/8/1
bwd_dkdv  120 16b  | 16x128/8/1 32x32/8/1   | 32x32/8/1 16x64/8/1    | 16x32/4/1 32x32/8/1
bwd_dkdv  120 fp32 | 32x16/8/1 16x16/8/1    | 16x16/8/1              | 16x32/8/1 16x16/8/1
bwd_dq    120 16b  | 128x32/8/2 64x32/4/2   | 64x64/8/2 64x32/4/2    | 32x32/4/2
bwd_dq    120 fp32 | 16x16/4/1 32x16/8/1    | 16x64/8/1 16x16/8/1    | 16x32/8/1
"""

# The light switches (key padding, ALiBi, softcap, a left window edge, any subset; no attn_mask,
# no dropout; dense, not varlen): the plain tiles where they stay clean (AOT, Triton 3.9 and
# 3.7.1, causal; all four on, MHA and, for dK/dV, GQA 4:1; softcap alone for the 16-bit cells on
# 3.9; the `inspect --op masked` plans attn_*+light), so sm_90 16-bit keeps wgmma except dK/dV at
# D=256 (mma.sync, as plain) and a 32x32/8/1 candidate at D=128 (GQA: 212-214 regs, 0 B). Each
# switch costs instructions, not tiles: on the plain tile the sm_90 fp16 D=128 forward's
# serialized estimate is 0.55 plain, 0.46 ALiBi, 0.33 softcap (tanh), 0.47 key padding, 0.55
# window, 0.27 all four (0.17 on the masked table's 32x32/8/1 before). docs/masked-performance.md
# has the tables. sm_90 16-bit D<=64: 64x64/4/3 dropped when the forward folded log2 e (44 B
# spilled on Triton 3.7.1, all four switches, non-causal MHA; 128x64/8/3: 0 B).
# Rejected (spill bytes, Triton 3.9 unless noted): sm_90 fwd D=64 128x128/8/3 592; D=128
# 64x64/4/3 276 (3.7.1); D=256 64x32/4/2 232, 128x64/8/2 948, 64x64/8/2 64, 128x32/8/2 16.
# sm_80 fwd D=64 128x64/8/3 and 64x64/4/3 16 with softcap alone; D=128 64x64/4/3 32; D=256
# 32x32/4/2 32 (softcap alone). dK/dV GQA 4:1: sm_90 D=64 64x64/8/2 556, D=128 16x128/8/2 160
# (16x64/4/2 376-428, 16x64/4/1 420), D=256 16x32/4/1 52; sm_80 D=64 32x128/8/2 120, D=128
# 16x128/8/2 272, 32x64/8/2 436, 16x64/8/2 92-100, D=256 16x32/4/1 176. dQ sm_80 D=256 64x64/8/2
# 16. fp32 at D > 64 keeps the masked variant's exact-FMA dots (options._dot_precision) in FMA
# tiles: sm_90 fwd D=128 16x32/8/1 16, 32x32/8/1 128; dK/dV D=256 16x32/8/1 224, 32x16/8/1 264;
# sm_80 fwd D=128 32x32/8/1 24 (3.7.1), 16x64/8/1, 16x32/8/1, 32x16/8/1 16 each; fwd D=64
# (tf32x3) 64x32/4/2 216, 64x32/8/2 1512, 32x32/4/2 16; dQ D=256 32x16/8/1 24 (3.7.1); dK/dV
# D=128 GQA 32x16/8/1 52. Open: fp32 dK/dV under GQA 4:1 has no tile clean on both versions on
# sm_90 (D=64 16x32/4/1 20 B on 3.7.1; D=128 32x16/8/1 168 B on 3.7.1, 16x16/8/1 36 B on 3.9;
# D=256 16x16/8/1 16-80 B) nor on sm_80 at D=256 (32x16/8/1 40 B on 3.7.1, 16x16/8/1 8 B on
# 3.9), as in the masked table, whose tiles these launches used before. sm_86/sm_120: sm_80's
# cells within 99 KB.
# sm_80 fwd 16b D<=128: 128x32/8/3 spilled 8 B (255 regs, Triton 3.9 and 3.7.1) with all four
#   light switches once ALiBi / softcap / key padding took their cheaper forms (_common._scores;
#   0 B before, also 255 regs); 64x32/4/3: 255 regs, 0 B on both. The same held for sm_86's
#   128x32/8/2 (24 B) and sm_120's 128x32/8/3 (108 B; Triton 3.9, non-causal, found
#   2026-12-07): 64x32/4/3 alone there too (245-246 regs, 0 B).
# fwd sm_90 fp32 D<=128: 16x64/8/2 + 16x16/8/1 since the compensated exact scores (2026-12-08):
#   16x64/8/1 spilled 24 B (255 regs; 226 regs, 0 B before), 16x32/8/1 72 B (128 regs),
#   16x64/4/1 292 B, 16x32/4/1 16 B; 16x64/8/2 214 regs and 16x16/8/1 98 regs, 0 B (Triton 3.9).
_LIGHT = """
# kernel  sm  elem | D <= 64                | D <= 128               | D <= 256
fwd       90  16b  | 128x64/8/3             | 128x64/8/3 64x32/4/3   | 64x16/4/2 64x32/8/2
fwd       90  fp32 | 64x32/4/2              | 16x64/8/2 16x16/8/1    | 32x16/8/1 16x32/8/1
fwd       80  16b  | 128x32/8/3 64x32/8/2   | 64x32/4/3              | 64x32/8/2
fwd       80  fp32 | 32x32/8/1              | 16x16/8/1              | 32x16/8/1
bwd_dkdv  90  16b  | 32x128/8/2             | 16x64/8/2 32x32/8/1    | 16x32/8/1 32x16/8/1
bwd_dkdv  90  fp32 | 32x16/8/1              | 16x16/8/1              | 16x16/8/1
bwd_dkdv  80  16b  | 16x128/8/2             | 16x64/8/1 32x32/8/1    | 16x32/8/1 32x16/8/1
bwd_dkdv  80  fp32 | 32x16/8/1 16x16/8/1    | 16x16/8/1              | 32x16/8/1 16x16/8/1
bwd_dq    90  16b  | 128x32/8/2 128x64/8/2  | 128x32/8/2 64x64/8/2   | 128x32/8/2 64x32/8/2
bwd_dq    90  fp32 | 64x16/4/2              | 16x32/8/1 16x16/8/1    | 32x32/8/1 16x32/8/1
bwd_dq    80  16b  | 128x32/8/2 64x32/4/2   | 64x64/8/2 64x32/4/2    | 64x32/8/2 32x32/4/2
bwd_dq    80  fp32 | 16x32/8/1 16x16/8/1    | 16x64/8/1 16x16/8/1    | 16x32/8/1
fwd       86  16b  | 128x32/8/3 64x32/8/2   | 64x32/4/3              | 64x32/8/2
fwd       86  fp32 | 32x32/8/1              | 16x16/8/1              | 32x16/8/1
bwd_dkdv  86  16b  | 16x128/8/2             | 16x64/8/1 32x32/8/1    | 16x32/8/1 32x16/8/1
bwd_dkdv  86  fp32 | 32x16/8/1 16x16/8/1    | 16x16/8/1              | 32x16/8/1 16x16/8/1
bwd_dq    86  16b  | 128x32/8/2 64x32/8/2   | 64x64/8/2 64x32/4/2    | 32x32/4/2
bwd_dq    86  fp32 | 16x32/8/1 16x16/8/1    | 16x64/8/1 16x16/8/1    | 16x32/8/1
fwd       120 16b  | 128x32/8/3 64x32/8/2   | 64x32/4/3              | 64x32/8/2
fwd       120 fp32 | 32x32/8/1              | 16x16/8/1              | 32x16/8/1
bwd_dkdv  120 16b  | 16x128/8/2             | 16x64/8/1 32x32/8/1    | 16x32/8/1 32x16/8/1
bwd_dkdv  120 fp32 | 32x16/8/1 16x16/8/1    | 16x16/8/1              | 32x16/8/1 16x16/8/1
bwd_dq    120 16b  | 128x32/8/2 64x32/4/2   | 64x64/8/2 64x32/4/2    | 32x32/4/2
bwd_dq    120 fp32 | 16x32/8/1 16x16/8/1    | 16x64/8/1 16x16/8/1    | 16x32/8/1
"""

# Any masked switch (attn_mask, key padding, ALiBi, softcap, dropout, a left window edge; the
# `inspect --op masked` plan has every one on, with the float mask's gradient): register-bound,
# even 64x32/4 spilled at D=64 fp16 (sm_80, 255 regs + 48 B), so 32-row tiles with 8 warps
# (e.g. sm_80 fp16 D=128 fwd 32x32/8: 244 regs, 0 B). Used with an attn_mask or dropout (any
# other switch may be on too); the light switches alone take _LIGHT. A dense mask or dropout alone
# on the plain tiles (AOT, Triton 3.9, causal MHA fp16) spilled: bool mask sm_90 fwd D=128
# 128x64/8/3 2600 B, D=256 64x32/4/2 1300 B, dq D=256 128x32/8/2 232 B; sm_80 fwd D=128
# 128x32/8/3 160 B; dropout sm_90 fwd D=64 128x64/8/3 32 B, D=128 396 B; sm_80 dkdv D=128
# 16x128/8/2 32 B, D=256 16x32/4/1 120 B. With every switch on, wgmma tiles that compile
# spill-free on sm_90 (3.9; 64x16/4/1 fwd D=64/128, 16x64/4/1 and 32x64/4/1 dkdv D=64, 64x16/4/1
# dq D=64/128) estimate about what 32x32/8/1's mma.sync does (serialized, fwd D=128: 0.094 vs
# 0.095; dq D=128 0.158 vs 0.174; dkdv D=64 0.119 vs 0.106, not checked on 3.7.1): the loop is
# bound by the mask's address arithmetic and the per-element Philox, not the MMA, so the table
# is kept. With the 8-key dropout draw (2026-12-07) these cells spilled and were dropped
# (non-causal, every switch on): sm_90 fwd D=64 32x32/8/1 60 B on Triton 3.7.1 (ptxas held it
# to 128 registers; 176 regs, 0 B with the 4-key draw), fp32 sm_80 fwd D=64 32x16/8/1 52 B
# and D=256 16x32/8/1 24 B (3.9), sm_90 fp32 fwd D=256 32x32/8/1 80 B (3.9; 186 regs, 0 B
# before); sm_86 / sm_120 fp32 follow sm_80. sm_90 16-bit dQ at
# D=256: 32x16/8/1 only (32x32/8/1 spilled 44 B on Triton 3.9, every switch on, non-causal;
# 56 B with the 8-key dropout draw). sm_90 fp32 D <= 128 (exact-FMA dots): fwd 16x16/8
# spilled 32 B and
# dK/dV 32x16/8 68 B on Triton 3.7.1 (128 regs), dK/dV 16x32/8 48 B on 3.9; fwd 32x32/8: 142-144
# regs, 16x32/8: 127-128, 0 B on both. No dK/dV tile tried (7) is spill-free on both versions:
# 16x16/8/1 is on 3.9 (144 regs) and spills 36 B on 3.7.1.
_MASKED = """
# kernel  sm  elem | D <= 64                | D <= 128               | D <= 256
fwd       90  16b  | 32x16/8/1              | 32x32/8/1 32x16/8/1    | 32x32/8/1 32x16/8/1
fwd       90  fp32 | 16x32/8/1 16x16/8/1    | 16x32/8/1 16x16/8/1    | 32x16/8/1
fwd       80  16b  | 32x32/8/1 32x16/8/1    | 32x32/8/1 32x16/8/1    | 32x32/8/1 32x16/8/1
fwd       80  fp32 | 16x32/8/1              | 16x16/8/1 16x32/8/1    | 32x16/8/1
bwd_dkdv  90  16b  | 32x32/8/1 32x16/8/1    | 32x32/8/1 32x16/8/1    | 32x32/8/1 32x16/8/1
bwd_dkdv  90  fp32 | 16x16/8/1              | 16x16/8/1              | 32x16/8/1 16x16/8/1
bwd_dkdv  80  16b  | 32x32/8/1 16x32/8/1    | 32x32/8/1 32x16/8/1    | 32x16/8/1 16x32/8/1
bwd_dkdv  80  fp32 | 16x16/8/1              | 16x16/8/1              | 32x16/8/1 16x32/8/1
bwd_dq    90  16b  | 32x32/8/1 32x16/8/1    | 32x32/8/1 32x16/8/1    | 32x16/8/1
bwd_dq    90  fp32 | 16x32/4/1              | 16x32/8/1              | 32x16/8/1 16x32/8/1
bwd_dq    80  16b  | 32x32/8/1 32x16/8/1    | 32x32/8/1 32x16/8/1    | 32x32/8/1 32x16/8/1
bwd_dq    80  fp32 | 16x32/8/1 16x16/8/1    | 16x32/8/1              | 32x16/8/1 16x32/8/1
fwd       86  16b  | 32x32/8/1 32x16/8/1    | 32x32/8/1 32x16/8/1    | 32x32/8/1 32x16/8/1
fwd       86  fp32 | 16x32/8/1              | 16x16/8/1 16x32/8/1    | 32x16/8/1
bwd_dkdv  86  16b  | 32x32/8/1 16x32/8/1    | 32x32/8/1 32x16/8/1    | 32x16/8/1 16x32/8/1
bwd_dkdv  86  fp32 | 16x16/8/1              | 16x16/8/1              | 32x16/8/1 16x32/8/1
bwd_dq    86  16b  | 32x32/8/1 32x16/8/1    | 32x32/8/1 32x16/8/1    | 32x32/8/1 32x16/8/1
bwd_dq    86  fp32 | 16x32/8/1 16x16/8/1    | 16x32/8/1              | 32x16/8/1 16x32/8/1
fwd       120 16b  | 32x32/8/1 32x16/8/1    | 32x32/8/1 32x16/8/1    | 32x32/8/1 32x16/8/1
fwd       120 fp32 | 16x32/8/1              | 16x16/8/1 16x32/8/1    | 32x16/8/1
bwd_dkdv  120 16b  | 32x32/8/1 16x32/8/1    | 32x32/8/1 32x16/8/1    | 32x16/8/1 16x32/8/1
bwd_dkdv  120 fp32 | 16x16/8/1              | 16x16/8/1              | 32x16/8/1 16x32/8/1
bwd_dq    120 16b  | 32x32/8/1 32x16/8/1    | 32x32/8/1 32x16/8/1    | 32x32/8/1 32x16/8/1
bwd_dq    120 fp32 | 16x32/8/1 16x16/8/1    | 16x32/8/1              | 32x16/8/1 16x32/8/1
"""

# Dropout as the only switch (options._variant "dropout": no attn_mask, no light switch, dense;
# causal or a right window edge allowed; the `inspect --op masked` plans attn_*+dropout). AOT,
# Triton 3.9 and 3.7.1, fp16, causal and not, MHA and (dK/dV) GQA 4:1 causal: spill-free, no
# ptxas warning. The figures below were measured with the draw per 4 keys; the draw per 8 keys
# that follows the MMA accumulator (_common._dropout_keep, 2026-12-07) raised every 16-bit
# cell (docs/masked-performance.md, "Dropout: one draw per 8 keys"; e.g. sm_90 fwd D=64
# 128x64/8/3 0.249 -> 0.315) and took sm_90 fwd D=128 128x64/8/3 over the register file (255
# regs, 24-48 B spilled, 3.9): 128x64/8/2 (252-254 regs, 0 B, est. 0.452) and 64x64/4/3 (209-238
# regs, 0.446; MHA and GQA 4:1, fp16 and bf16) replace it and 128x32/8/3 (0.391). It also let
# dK/dV at D=128 onto bigger tiles, clean with MHA and GQA 4:1, causal and not, on 3.9 and
# 3.7.1: sm_90 16x128/8/2 (wgmma, 212-255 regs, est. 0.404-0.407 | 0.401-0.404; before
# 32x32/8/1 mma.sync 0.245; it spilled 176-200 B with GQA under the 4-key draw), sm_80
# 32x32/8/1 (173-202 regs, 0.366-0.368 | 0.326-0.329; before 32x16/8/1 0.311 | 0.292; it
# spilled 24 B on 3.7.1 under the 4-key draw). Rejected: sm_80 32x64/8/2 (136 B, 3.7.1 GQA
# non-causal), 16x128/8/2 (416 B GQA), sm_90 16x128/8/1 (68 B GQA). sm_86 / sm_120 keep
# their cells (not compiled with the new draw at this tile).
# Useful serialized ESTIMATES (`inspect --perf`, serialized / replication, causal
# MHA, Triton 3.9 | 3.7.1), against the masked table's 32x32/8/1 that dropout used before.
# sm_90 16-bit (wgmma except where noted):
#   fwd D=64 128x64/8/3 0.249 | 0.242 (masked 32x32/8/1: 0.097), 64x64/4/3 0.246 | 0.241;
#     128x128/8/3 spilled 124 | 352 B. D=128 128x64/8/3 0.382 | 0.374 (255 regs, 0 B),
#     128x32/8/3 0.335 | 0.336; 64x64/4/3 spilled 16 | 32 B. D=256 64x16/4/2 0.355 | 0.368,
#     64x32/8/2 0.269 | 0.295 (replication 1.5).
#   dK/dV D=64 32x128/8/1 0.294 | 0.305 (GQA 0.300 | 0.303), 32x128/8/2 0.278 | 0.289.
#     D=128: no wgmma tile clean with GQA 4:1 but 16x64/8/2 (0.185 | 0.205, replication 1.5;
#     GQA 0.201 | 0.228): 16x128/8/2 (MHA 0.365, clean) spilled 200 | 176 B with GQA, 16x128/8/1
#     160 | 56, 32x64/8/1 516 | 92, 16x64/4/1 116 | 132, 16x64/4/2 572 | 480; so 32x32/8/1
#     (mma.sync, 0.234 | 0.202) first. D=256 mma.sync as plain: 16x32/4/1 (MHA 0.304) spilled
#     36 | 44 B with GQA; 32x32/8/1 0.309 | 0.268, 32x16/8/1 0.248 | 0.222.
#   dQ D=64 128x64/8/2 0.334 | 0.331, 128x32/8/2 0.310 | 0.318. D=128 128x64/8/2 0.484 | 0.485
#     (255 regs, 0 B), 128x32/8/2 0.447 | 0.463. D=256 128x16/8/2 0.463 | 0.545; 128x32/8/2
#     spilled 16 | 84 B, 64x32/8/2 112 B (3.9), 64x16/4/2 188 B (3.7.1), 64x32/4/1 664 | 932.
# sm_80 16-bit (mma.sync): fwd D=64 128x32/8/3 0.368 | 0.341 (128x64/8/3 spilled 16 B on 3.7.1;
#   64x32/8/2 0.214, replication 2). D=128 128x32/8/3 0.505 | 0.461, 64x32/4/3 0.422 | 0.382.
#   D=256 32x32/4/2 0.523 | 0.456, 64x32/8/2 0.364 | 0.339.
#   dK/dV, GQA 4:1 the binding case: D=64 16x64/4/1 0.444 | 0.428 (GQA), 32x32/8/1 0.264 | 0.235;
#     16x128/8/2 (MHA 0.434) spilled 152 | 192 B with GQA, 32x128/8/2 16 | 44 B MHA, 16x64/8/2
#     104 | 112 GQA. D=128 32x16/8/1 0.300 | 0.268, 16x64/8/1 0.220 | 0.214 (replication 2.5);
#     32x32/8/1 spilled 24 B (3.7.1 MHA), 16x128/8/2 424 | 536, 16x64/4/1 120 | 152 (GQA).
#     D=256 32x16/8/1 0.370 | 0.342, 16x32/8/1 0.249 | 0.242; 16x32/4/1 (MHA 0.427) spilled
#     84 | 156 B with GQA.
#   dQ D=64 128x32/8/2 0.495 | 0.466, 64x32/4/2 0.485 | 0.459. D=128 64x64/8/2 0.606 | 0.538,
#     64x32/4/2 0.584 | 0.566. D=256 64x64/8/2 0.675 | 0.642, 32x32/4/2 0.646 | 0.637.
# fp32: the masked table's cells (exact-FMA dots at D > 64, as masked: options._dot_precision)
#   where they stay spill-free with dropout alone (causal; fwd / dQ MHA, dK/dV GQA 4:1). Not:
#   sm_90 fwd D=128 32x32/8/1 (708 | 580 B spilled), D=256 32x32/8/1 (9.5 KB at the 128-register
#   cap) and 32x16/8/1 (8 B on 3.9); sm_80 dK/dV D=128 (GQA) 32x16/8/1 52 | 52 B and 32x32/8/1
#   40 B on 3.9, so 16x16/8/1 (as the light table); sm_80 dQ D=256 32x16/8/1 8 B on 3.9. Open,
#   as in the masked and light tables: sm_90 dK/dV D=256 under GQA 4:1 spills on 3.7.1
#   (32x16/8/1 60 B, 16x16/8/1 32 B; 0 on 3.9): the masked cell is kept.
# The 8-key draw spilled two sm_90 fp32 dQ cells (Triton 3.9; 0 B with the 4-key draw): D=128
#   16x32/8/1 8 B (non-causal), D=256 32x16/8/1 32 B (causal, held to 128 registers), and on
#   Triton 3.7.1 sm_90 dK/dV D=256 32x16/8/1 956-984 B (154 regs, 0 B before), sm_80 fwd D=128
#   32x32/8/1 8 B (causal): dropped (sm_86 / sm_120 fwd as sm_80). The 16x32/8/1 now first in
#   sm_90's D=256 dQ spills 16 B on 3.7.1 (causal, 128 regs), as 32x16/8/1 did before (24 B).
# sm_86 / sm_120: sm_80's cells within 99 KB (dQ D=256 16-bit: 32x32/4/2, as plain); sm_86
#   16-bit checked on Triton 3.9 (causal; fwd D=128 and dK/dV with GQA 4:1): spill-free.
_DROPOUT = """
# kernel  sm  elem | D <= 64                | D <= 128               | D <= 256
fwd       90  16b  | 128x64/8/3 64x64/4/3   | 128x64/8/2 64x64/4/3   | 64x16/4/2 64x32/8/2
fwd       90  fp32 | 32x32/8/1 32x16/8/1    | 16x32/8/1              | 16x32/8/1
fwd       80  16b  | 128x32/8/3             | 128x16/8/3 64x32/4/3   | 32x32/4/2 64x32/8/2
fwd       80  fp32 | 32x32/8/1 32x16/8/1    | 32x16/8/1              | 32x16/8/1 16x32/8/1
bwd_dkdv  90  16b  | 32x128/8/1 32x128/8/2  | 16x128/8/2 32x32/8/1   | 32x32/8/1 32x16/8/1
bwd_dkdv  90  fp32 | 32x16/8/1 16x16/8/1    | 16x16/8/1              | 16x16/8/1
bwd_dkdv  80  16b  | 16x64/4/1 32x32/8/1    | 32x32/8/1 32x16/8/1    | 32x16/8/1 16x32/8/1
bwd_dkdv  80  fp32 | 32x16/8/1 16x16/8/1    | 16x16/8/1              | 32x16/8/1 16x32/8/1
bwd_dq    90  16b  | 128x64/8/2 128x32/8/2  | 128x64/8/2 128x32/8/2  | 128x16/8/2
bwd_dq    90  fp32 | 32x16/8/1              | 16x16/8/1              | 16x32/8/1
bwd_dq    80  16b  | 128x32/8/2 64x32/4/2   | 64x64/8/2 64x32/4/2    | 64x64/8/2 32x32/4/2
bwd_dq    80  fp32 | 32x16/8/1 16x32/8/1    | 16x32/8/1 16x16/8/1    | 16x32/8/1
fwd       86  16b  | 128x32/8/3             | 128x16/8/3 64x32/4/3   | 32x32/4/2 64x32/8/2
fwd       86  fp32 | 32x32/8/1 32x16/8/1    | 32x16/8/1              | 32x16/8/1 16x32/8/1
bwd_dkdv  86  16b  | 16x64/4/1 32x32/8/1    | 32x16/8/1 16x64/8/1    | 32x16/8/1 16x32/8/1
bwd_dkdv  86  fp32 | 32x16/8/1 16x16/8/1    | 16x16/8/1              | 32x16/8/1 16x32/8/1
bwd_dq    86  16b  | 128x32/8/2 64x32/4/2   | 64x64/8/2 64x32/4/2    | 32x32/4/2
bwd_dq    86  fp32 | 32x16/8/1 16x32/8/1    | 16x32/8/1 16x16/8/1    | 16x32/8/1
fwd       120 16b  | 128x32/8/3             | 128x16/8/3 64x32/4/3   | 32x32/4/2 64x32/8/2
fwd       120 fp32 | 32x32/8/1 32x16/8/1    | 32x16/8/1              | 32x16/8/1 16x32/8/1
bwd_dkdv  120 16b  | 16x64/4/1 32x32/8/1    | 32x16/8/1 16x64/8/1    | 32x16/8/1 16x32/8/1
bwd_dkdv  120 fp32 | 32x16/8/1 16x16/8/1    | 16x16/8/1              | 32x16/8/1 16x32/8/1
bwd_dq    120 16b  | 128x32/8/2 64x32/4/2   | 64x64/8/2 64x32/4/2    | 32x32/4/2
bwd_dq    120 fp32 | 32x16/8/1 16x32/8/1    | 16x32/8/1 16x16/8/1    | 16x32/8/1
"""


def parse_table(text: str) -> dict:
    """{kernel: {arch family: [(max BLOCK_D, element bytes, [triton.Config])]}} from a table
    above (bucket order within an arch: 16-bit rows first, as the tables are written)."""
    table: dict = {}
    for line in text.strip().splitlines():
        if line.startswith("#"):
            continue
        head, *cells = (part.strip() for part in line.split("|"))
        kernel, arch, elem = head.split()
        assert len(cells) == len(HEAD_DIM_BUCKETS), line
        rows = table.setdefault(kernel, {}).setdefault(int(arch), [])
        for max_d, cell in zip(HEAD_DIM_BUCKETS, cells):
            # "-": no config (bwd_fused: no spill-free tile; the deterministic kernels run)
            cfgs = [_cfg(*(int(x) for x in c.replace("x", "/").split("/")))
                    for c in cell.split() if c != "-"]
            rows.append((max_d, 4 if elem == "fp32" else 2, cfgs))
    for by_arch in table.values():  # 16-bit buckets before fp32 ones, as configs_for expects
        for arch, rows in by_arch.items():
            by_arch[arch] = sorted(rows, key=lambda r: r[1])
    return table


GPU_CONFIGS = parse_table(_PLAIN)
VARIANT_CONFIGS = {"varlen": parse_table(_VARLEN), "light": parse_table(_LIGHT),
                   "masked": parse_table(_MASKED), "dropout": parse_table(_DROPOUT)}

# The varlen forward over a paged KV cache (block_table; the `inspect --op varlen` plan
# attn_fwd+paged16): the varlen fwd cells, except these {(arch family, element bytes, BLOCK_D
# bucket): configs}, where the paged kernel spilled with one of them (AOT, Triton 3.9, page 16,
# causal and not; sm_80/sm_90 fp16, bf16, fp32 and sm_86/sm_120 fp16, fp32 at D=64/128/256
# compiled): sm_80 fp32 D=256 32x16/8/1 8 B (causal; 16x32/8/1: 119 regs, 0 B); sm_86 fp32
# D=64 64x32/4/2 124-180 B (unpaged 0 B; 128x32/8/3: 0 B); sm_120 fp16 D=128 64x64/4/3 268 B
# (unpaged 88-136 B; 128x32/8/3: 0 B). Unpaged and paged alike spilled at sm_120 fp32 D=64
# (84-516 B, both cells). Since fp32 D <= 64 computes exact scores (their re-sweep, above),
# sm_86 / sm_120 take sm_80's varlen cells there, paged too (the sm_86 128x32/8/3 cell needed
# 114,944 B of shared memory with them, over 99 KB). sm_80 fp16 D=64 causal 128x32/8/3: 8 B
# on Triton 3.7.1 once the forward folded log2 e (128 regs; 128x64/8/3: 0 B).
PAGED_FWD = {(80, 4, 256): [_cfg(16, 32, 8, 1)],
             (120, 2, 128): [_cfg(128, 32, 8, 3)], (80, 2, 64): [_cfg(128, 64, 8, 3)]}


# The 16-bit forward with K / V through tensor descriptors (launch.use_tma), {(arch family,
# head dim, variant): configs}; a launch takes descriptors only in these measured cells (AOT,
# Triton 3.9 and 3.7.1, causal and not, MHA and GQA 4:1, fp16 and bf16: spill-free).
# sm_90 (TMA): without the per-thread pointer tensors the 128x128 tile fits (pointer loads: 255
#   regs and 72-104 B spilled at D=128); D=128 128x128/8/3: 191-218 regs, 230,400 B smem,
#   serialized est. 0.66; 128x64/8/3 0.60-0.62. varlen: its own table's tiles, clean with TMA.
# sm_80 D=128: descriptors lower to cp.async, and 128x64/8/3 drops from 255 regs + 76-100 B
#   spilled (pointers) to 213-226 regs, 0 B: est. 0.69 (128x32/8/3: 0.667 with pointers, 0.638
#   with descriptors). Not at D=64 (128x64/8/3 is clean with pointers), not sm_86/sm_120 (unmeasured).
TMA_FWD = {
    (90, 128, "plain"): [_cfg(128, 128, 8, 3), _cfg(128, 64, 8, 3)],
    (90, 64, "plain"): [_cfg(128, 128, 8, 3), _cfg(128, 64, 8, 3)],
    (90, 128, "varlen"): [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)],
    (90, 64, "varlen"): [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3)],
    (80, 128, "plain"): [_cfg(128, 64, 8, 3), _cfg(128, 32, 8, 3)],
    # one light switch alone (options._tma_cell; the note below)
    **{(90, d, cell): [_cfg(128, 128, 8, 3), _cfg(128, 64, 8, 3)]
       for d in (64, 128) for cell in ("light:kpm", "light:window")},
    (80, 128, "light:kpm"): [_cfg(128, 64, 8, 3)],
    (80, 128, "light:window"): [_cfg(128, 32, 8, 3)],
}


# One light switch alone (options._tma_cell): "light:kpm" (key padding the only light switch)
# and "light:window" (a left window edge the only one) run the light kernel on plain's
# descriptor tiles, forward (TMA_FWD) and backward. The light table's tiles must hold all four
# switches, and plain's biggest do not (sm_90 fp16 D=128 forward 128x128/8/3, Triton 3.9: all
# four 656 B spilled, key padding with the window 172 B, ALiBi alone 272-280 B causal). AOT,
# fp16, causal and not, MHA and GQA 4:1 (the fused kernel MHA: GQA runs it split over the
# group), spill-free on Triton 3.9 and 3.7.1; serialized ESTIMATES of the best shipped tile,
# causal MHA, 3.9 | 3.7.1, and against plain's best on the same versions:
# sm_90 key padding: fwd D=128 128x128/8/3 0.590 | 0.631 (0.89x | 0.96x), D=64 0.438 | 0.471
#   (0.89x | 0.96x); dQ 128x64/8/2 D=128 0.668 | 0.677 (0.91x), D=64 0.520 | 0.527 (0.87x |
#   0.88x); dK/dV D=128 MHA 32x128 0.639 | 0.651 (0.96x; GQA keeps the light table's pointer
#   tiles, as plain's GQA does), D=64 0.568 | 0.592 (0.91x | 0.92x); fused D=64 0.582 | 0.608
#   (0.92x | 0.93x). Before, on the plain table's pointer tile: fwd D=128 0.520, dQ 0.633.
#   Rejected: dQ D=64 128x128/8/2 144-148 B (non-causal, 3.9).
# sm_90 window: plain's figures (the edge only bounds the loops): fwd 0.660 | 0.660 (D=128),
#   0.492 | 0.492 (D=64); dQ 0.734 | 0.746, 0.600 | 0.600; dK/dV 0.663 | 0.681, 0.621 | 0.640;
#   fused D=64 0.633 | 0.651 (0.99x-1.00x).
# sm_80 D=128, the forward only (descriptors lower to cp.async): key padding 128x64/8/3 0.597 |
#   0.596 (0.86x plain's 0.691), window 128x32/8/3 0.637 | 0.636 (0.92x). Rejected: key padding
#   128x32/8/3 16 B (non-causal, both versions), window 128x64/8/3 16 B (3.7.1), and the dQ's
#   128x64/8/2 with either switch (16-32 B); those keep the light table.


# The 16-bit backward with its streamed tiles through tensor descriptors (launch.use_tma_bwd:
# Q / dO in dK/dV and the fused kernel, K / V in dQ), {(arch family, head dim, variant,
# kernel, "mha" | "gqa"): configs}; a launch takes descriptors only in these measured cells
# (AOT, Triton 3.9 and 3.7.1, causal and not, MHA and GQA 4:1 for "gqa", fp16: spill-free,
# no ptxas warning, replication 1.00; serialized ESTIMATES, Triton 3.9 | 3.7.1).
# Since dK/dV's unbounded query loop lost its row mask (#17: the ragged last query tile runs in
# the bounded loop; 48 of 389 instructions per iteration fewer at sm_90 D=64 64x64/4/2), causal:
# sm_90 dK/dV D=128: the 32-row query tile fits once Q / dO come by TMA: 32x128/8/2 MHA
#   205-230 regs, est. 0.664 | 0.681 (/1: 0.668 | 0.638; pointers: 16x128, 0.49-0.56). Not for
#   GQA: 32x128/8/2 spills 56 B on 3.7.1, /1 88 B on 3.9 (before: 136 B on 3.7.1 with /2, 120 B
#   on 3.9 with /1); the pointer tiles run, 16x128/8/1 240-250 regs, est. 0.646 | 0.638
#   (16x128/8/2 0.563 | 0.594). K / V loads and dK / dV stores by descriptor as well made it
#   worse (224-228 B, 3.9, before).
# sm_90 dK/dV D=64: 64-row query tiles, 64x64/4/2 (165-223 regs) est. 0.621-0.626 |
#   0.638-0.641 and 64x128/8/2 0.610-0.612 | 0.621-0.624 (before: 0.579-0.584 | 0.595-0.599;
#   pointers: 32x128, 0.47-0.53).
# sm_90 dQ: D=128 128x64/8/2 160-188 regs, est. 0.736 | 0.748 (pointers 0.692); 128x128/8/2
#   0.750 but 52 B spilled on 3.7.1. D=64 128x64/8/2 and 128x128/8/2: 0.600 both.
# sm_90 fused D=64: 64x128/8/2 219-248 regs, est. MHA 0.621 | 0.633, GQA 0.615 | 0.630 (GQA
#   before 0.571-0.575 | 0.578-0.584; MHA spilled 16 B, causal, 3.9, and ran the pointer tile
#   32x128/8/1, 0.53 | 0.52, now 0.578 | 0.565); MHA also 64x64/4/2 (210-233 regs, 0.622 |
#   0.639; GQA: 136 B | 112 B spilled).
#   D=128: still no tile for both MHA and GQA (the plain table's row is shared): MHA pointer
#   16x128/8/1 now fits (242 | 250 regs, est. 0.572 | 0.556; /2: 0.551 | 0.575), GQA 4:1
#   spills it (320 B, 3.9; /2 112 B); with descriptors 32x128/8/2 MHA 250 regs, est. 0.638 on
#   3.9 but 360 B spilled on 3.7.1, /1 48 B on 3.9 and 0 B on 3.7.1 (0.623), GQA 252-616 B.
#   A TMA reduce-add of dQ per tile cannot run in the interpreter: not an option.
# sm_80 dQ D=128: descriptors lower to cp.async and 128x64/8/2 fits (255 regs, 0 B; pointers
#   668 B spilled): est. 0.803-0.805 (pointers 64x64/8/2: 0.741-0.751; with descriptors 0.738,
#   more non-MMA instructions per MMA, so the cell has the one tile). Not taken where the
#   pointer tile scores as high: sm_80 dK/dV D=64 32x128/8/2 (0.711 vs 0.716), D=128 16x128/8/2
#   (0.765 vs 0.761), dQ D=64 128x64/8/2 (0.744 vs 128x32/8/2 0.750; causal GQA 4:1, 3.9).
TMA_BWD: dict = {
    **{(90, 128, "plain", "bwd_dkdv", "mha"): [_cfg(32, 128, 8, 2), _cfg(32, 128, 8, 1)]},
    **{(90, 64, "plain", "bwd_dkdv", h): [_cfg(64, 64, 4, 2), _cfg(64, 128, 8, 2)]
       for h in ("mha", "gqa")},
    **{(90, 128, "plain", "bwd_dq", h): [_cfg(128, 64, 8, 2)] for h in ("mha", "gqa")},
    **{(90, 64, "plain", "bwd_dq", h): [_cfg(128, 64, 8, 2), _cfg(128, 128, 8, 2)]
       for h in ("mha", "gqa")},
    (90, 64, "plain", "bwd_fused", "mha"): [_cfg(64, 128, 8, 2), _cfg(64, 64, 4, 2)],
    (90, 64, "plain", "bwd_fused", "gqa"): [_cfg(64, 128, 8, 2)],
    **{(80, 128, "plain", "bwd_dq", h): [_cfg(128, 64, 8, 2)] for h in ("mha", "gqa")},
    # one light switch alone (options._tma_cell; the note "One light switch alone" above)
    **{(90, 128, cell, "bwd_dkdv", "mha"): [_cfg(32, 128, 8, 2), _cfg(32, 128, 8, 1)]
       for cell in ("light:kpm", "light:window")},
    **{(90, 64, "light:kpm", "bwd_dkdv", h): [_cfg(64, 128, 8, 2), _cfg(64, 64, 4, 2)]
       for h in ("mha", "gqa")},
    **{(90, 64, "light:window", "bwd_dkdv", h): [_cfg(64, 64, 4, 2), _cfg(64, 128, 8, 2)]
       for h in ("mha", "gqa")},
    **{(90, d, cell, "bwd_dq", h): [_cfg(128, 64, 8, 2)]
       for d in (64, 128) for cell in ("light:kpm", "light:window") for h in ("mha", "gqa")},
    **{(90, 64, cell, "bwd_fused", "mha"): [_cfg(64, 128, 8, 2), _cfg(64, 64, 4, 2)]
       for cell in ("light:kpm", "light:window")},
}


# The 16-bit backward's pointer-load cells where MHA ships a tile that GQA cannot, {(arch
# family, head-dim bucket, variant, kernel): configs}, taken for MHA (Hq = Hkv) before the
# table's row, which MHA and GQA share (GQA compiles a loop over the group's query heads that
# costs registers; configs_for's `heads`). GQA split over its whole group (one query head per
# program, the fused path on a GPU: launch._gqa_split_for) compiles MHA's kernel and takes
# these cells too: sm_80 GQA 4:1 D=64 16x128/4/1 est. 0.743 | 0.743, D=128 16x128/8/1 0.767 |
# 0.769 (causal, 255 regs, 0 B). AOT, `inspect --perf`, fp16, causal | not, serialized
# ESTIMATES, Triton 3.9 | 3.7.1:
# sm_80 fused D=64: 16x128/4/1 255 regs, 0 B, est. 0.745 | 0.74 (the shared row's 16x64/4/1:
#   0.678; 4 warps along the 128 keys amortise the dQ tile's per-query-tile cost, its layout
#   conversion before the atomics and their addresses, over twice the MMAs). GQA 4:1 spills it
#   (80 B, /2 416 B; with descriptors 112-176 B); 32x128/4/1 spilled 196 B MHA.
# sm_80 fused D=128: 16x128/8/1 255 regs, 0 B, est. 0.765 (16x64/4/1 0.721; 16x128/4/1 3.6 KB
#   spilled). The table's D=128 cell is "-": GQA spilled every tile (configs' note above).
# Not sm_90 D=128: MHA 16x128/8/1 est. 0.572 | 0.556 (16x64/4/1 56 B, 32x64/4/1 204 B spilled)
#   is 13% | 9.9% faster per tile pair than the deterministic kernels (README, "Backward paths"),
#   under the 10% the default needs on 3.7.1.
BWD_MHA: dict = {
    (80, 64, "plain", "bwd_fused"): [_cfg(16, 128, 4, 1), _cfg(16, 64, 4, 1)],
    (80, 128, "plain", "bwd_fused"): [_cfg(16, 128, 8, 1), _cfg(16, 64, 4, 1)],
}


def configs_for(kernel: str, arch: int | None, block_d: int, elem_bytes: int,
                variant: str = "plain", heads: str = "gqa") -> list:
    """Candidate configs of `kernel` for a compute capability (None: the interpreter).

    variant: "plain" (dense, causal or not), "varlen" (packed sequences), "light" (key padding,
    ALiBi, softcap, a left window edge: the plain tiles that stay spill-free with them),
    "dropout" (dropout the only switch: big tiles measured with the Philox draw) or "masked" (an
    attn_mask, or dropout with any other switch; varlen with any switch): each has its own
    spill-free table, the masked one with smaller tiles (options._variant). "paged"
    (the forward only): varlen's, with the PAGED_FWD cells. "bwd_fused" (the backward's fused
    dK/dV/dQ kernel): [] where its table has no tile (a "-" cell or no row): the caller then
    runs the deterministic kernels. heads: "mha" (Hq = Hkv) takes BWD_MHA's cell where there
    is one; "gqa" (the default, the tiles both compile clean with) the table's."""
    if arch is None:
        return [INTERPRETER_CONFIGS[kernel]]
    if variant == "paged":  # the varlen forward through a block table (PAGED_FWD)
        for max_d in HEAD_DIM_BUCKETS:
            if block_d <= max_d:
                cfgs = PAGED_FWD.get((arch_family(arch), elem_bytes, max_d))
                if cfgs is not None:
                    return cfgs
                break
        variant = "varlen"
    if heads == "mha" and elem_bytes == 2:  # MHA's own cells (BWD_MHA)
        bucket = next((m for m in HEAD_DIM_BUCKETS if block_d <= m), None)
        cfgs = BWD_MHA.get((arch_family(arch), bucket, variant, kernel))
        if cfgs is not None:
            return cfgs
    table = GPU_CONFIGS if variant == "plain" else VARIANT_CONFIGS[variant]
    if kernel == "bwd_fused" and arch_family(arch) not in table.get(kernel, {}):
        return []  # no fused row for this table and arch: the deterministic kernels run
    for max_d, nbytes, cfgs in table[kernel][arch_family(arch)]:
        if block_d <= max_d and elem_bytes == nbytes:
            return cfgs
    raise ValueError(f"no {kernel} config for head dim {block_d}, {elem_bytes}-byte elements")


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16


@contextlib.contextmanager
def interpreter_configs(tiles: dict):
    """Within the block, the interpreted kernels use `tiles` ({kernel: triton.Config}, e.g.
    {"fwd": _cfg(128, 64, 4, 1)}) over INTERPRETER_CONFIGS (benchmarks: the interpreter's cost
    is per program and per loop iteration, so larger tiles run faster on a CPU). The shipped
    dict is never modified: the name is bound to a merged copy and bound back on exit.
    Process-wide while the block runs. No effect on compiled kernels (GPU_CONFIGS)."""
    global INTERPRETER_CONFIGS
    shipped = INTERPRETER_CONFIGS
    INTERPRETER_CONFIGS = {**shipped, **tiles}
    try:
        yield
    finally:
        INTERPRETER_CONFIGS = shipped
