"""Benchmark harness: `python -m tritformer bench` and the pytest-benchmark tests in benchmarks/.

One measurement per row, in tidy columns (`COLUMNS`), written as CSV and JSON, drawn as PNG plots.

What is measured where:
- CUDA: latency (median, p20, p80 of `triton.testing.do_bench`), TFLOP/s (GB/s for softmax),
  each also as a fraction of the datasheet peak on known GPUs (`DEVICE_PEAKS`), peak memory
  (`torch.cuda.max_memory_allocated` above what was allocated before the call), max error.
- CPU: PyTorch providers' latencies by torch.utils.benchmark's blocked_autorange (adaptive
  repetition, CPU_MIN_RUN_TIME s of calls per point). The fused kernels run in Triton's
  interpreter. Their latencies are interpreter times (the rows say backend=triton-interpreter)
  and say nothing about GPU speed (never shown as a speed ratio); no TFLOP/s is reported.
  What a CPU measures meaningfully is memory: the bytes each provider's call allocates (peak
  over the call, from the PyTorch profiler's allocation events) against sequence length, fused
  O(N) against naive O(N^2), and every provider's max error against float64.

FLOP counts (FlashAttention's benchmark convention):
    attention forward   4 * B * H * P * D       P = visible (query, key) pairs:
                                                Nq * Nk, or under the bottom-right causal mask
                                                sum_i clamp(i + Nk - Nq + 1, 0, Nk)
    attention backward  2.5 * forward           (5 matmuls against the forward's 2)
    forward + backward  3.5 * forward
    ffn forward         2 * M * (in * hidden + hidden * out)   (gated: 3 matmuls of M x in x I)
    ffn backward        2 * forward
    masked forward      4 * D * P_masked            P_masked = visible (query, key) pairs summed
                                                over batch and heads: (i, j) is visible iff
                                                the causal condition holds (if causal), the
                                                bool attn_mask[b, h, i, j] is True and
                                                key_padding_mask[b, j] is False. Padded query
                                                rows count too: the masked call computes them.
    varlen forward      sum_s 4 * H * P_s * D       P_s = visible pairs of packed sequence s:
                                                n_q,s * n_k,s, or causal (bottom-right within
                                                the sequence) as in the attention line
    masked / varlen backward and forward + backward: 2.5 and 3.5 * forward, as attention
    gpt forward         2 * M * W + sum_layers 4 * B * P * C
                                                M = B * T tokens, W = weights of every Linear
                                                (lm_head included; embeddings are lookups),
                                                P = causal visible pairs of T, C = n_embd
    gpt backward        2 * forward (the attention part 2.5x, counted as 2x: a lower bound)
    gpt decode          one new token per row against a cache of T - 1: 2 * B * W + L * 4 * B * T * C
Bytes for GB/s (the minimum a kernel must move): softmax forward reads x (+ the mask as
stored) and writes y; backward reads y and dy and writes dx. FFN forward reads x [M, d] and
the weights W (all matrices and biases) and writes y [M, d]: (2·M·d + W)·itemsize; backward
reads dy, x, W and writes dx and dW: (3·M·d + 2·W)·itemsize. Decode (memory-bound: GB/s is
its throughput, no TFLOP/s) reads K and V of each row's valid keys and q, and writes out:
    decode forward      (2 * sum_b L_b * Hkv * D + 2 * B * Hq * Nq * D) * itemsize
                                                L_b = cache_seqlens[b] (not the allocated
                                                Nmax: keys past L_b are never read); paged or
                                                contiguous alike; the int32 cache_seqlens and
                                                block table are not counted

The harness is a package: `core` (timing, memory, the row stream to CSV/JSON, providers'
plumbing, device setup, `run`/`bench_run`/`main`), `report` (the summary, skips, the full
table, plots with captions, report.md / index.html) and one module per op (`attention`,
`masked`, `varlen`, `softmax`, `ffn` (ffn and gated_ffn), `decode`, `gpt`, `ring`), each with
its sweep function; `run` iterates the ops' `bench` declarations in tritformer.registry. Every
name is re-exported here.
"""
from . import attention, core, decode, ffn, gpt, masked, report, ring, softmax, varlen
from .attention import (_FLEX, _MODE_FACTOR, INTERPRETER_TILES, AttentionSweep, _attention_call,
                        _SDPA_BACKENDS, _cu_seqlens, _flash_attn, _flex,
                        _large_interpreter_tiles, _max_error, _naive, _qkv, _reference64, _sdpa,
                        _sdpa_pinned, _sdpa_why_not, _tritformer, attention_cases,
                        attention_flops, attention_providers, attention_sweep, bench_attention,
                        interpreter_tiles, visible_pairs)
from .core import (COLUMNS, CPU_MIN_RUN_TIME, DEVICE_PEAKS, DTYPES, INSPECT_OPS, MODES, OPS,
                   PROVIDERS, BenchRun, Provider, ResultWriter, _active_providers, _backend,
                   _cuda_only, _fwd_bwd_fns, _leaf_modes, _module_missing, _percentiles,
                   _quiet_native_stderr, _sweep_rows, _timed_rows, adaptive_timing, bench_run,
                   device_peak, finish_report, inspect_command, machine_info, main, peak_bytes,
                   planned_cases, run, run_inspect, setup_device, time_ms, write_results)
from .decode import (DecodeCase, DecodeSweep, bench_decode, decode_bytes, decode_case,
                     decode_lengths, decode_providers, decode_reference64, decode_sweep,
                     page_count)
from .ffn import bench_ffn, ffn_bytes, saved_bytes
from .gpt import GPT_PROVIDERS, bench_gpt, gpt_flops, gpt_shape
from .masked import (MaskCase, _masked_flash_attn, _masked_flex, _masked_naive, _masked_sdpa,
                     _masked_tritformer, _sdpa_keep, bench_masked, document_mask, mask_case,
                     masked_flops, masked_max_error, masked_providers, masked_sweep,
                     masked_visible_pairs, padded_lengths)
from .report import (STYLES, caption, format_table, headlines, plot_results, skip_lines,
                     summary_lines, write_report)
from .ring import bench_ring
from .softmax import bench_softmax
from .varlen import (Packing, _packed_qkv, _varlen_flash_attn, _varlen_flex, _varlen_naive,
                     _varlen_sdpa, _varlen_tritformer, bench_varlen, packing, varlen_flops,
                     varlen_lengths, varlen_max_error, varlen_providers, varlen_sweep,
                     varlen_visible_pairs)
