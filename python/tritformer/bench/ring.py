"""`--op ring`: context-parallel attention on CPU (Gloo): peak memory per rank and communication
per step, against one process over the whole sequence.

    python -m tritformer bench --op ring [--quick]                     # rows like every op's
    python benchmarks/ring_memory.py                                  # N 4K 8K 16K x world 1 2 4
    python benchmarks/ring_memory.py --seq 16384 --world 4 --mode ring ulysses --json out.json
    python benchmarks/ring_memory.py --seq 65536 --world 2 4 --device cuda --dtype bfloat16

For each total sequence length N and world size W, W processes (Gloo, one thread each; NCCL,
one GPU each, on CUDA) hold their zigzag shard [B, H, N/W, D] of q, k, v and run one causal
attention forward + backward (`tritformer.distributed.ring_attention`, whole shards or in
`chunks` pieces, or `ulysses_attention`); the baseline is one process (one device) running
`tritformer.attention` over the whole sequence (on CPU: the torch fallback, PyTorch's flash SDPA
kernel, O(N) memory). Reported per rank (the maximum over ranks):

- peak_mb: the peak of the bytes allocated during forward + backward beyond what was live before
  (outputs, lse, gradients, received shards, accumulators, temporaries; the inputs are not
  counted), from the PyTorch profiler's memory events, as `tritformer.bench` measures CPU peaks.
- comm_mb: bytes this rank sends in one step (forward + backward): ring: the k/v shards it passes
  on (W-1 hops forward, W-1 backward) and the fp32 dK/dV accumulators (W hops); Ulysses: the
  all-to-all bytes that leave the rank (q, k, v and the output forward, their gradients back).
- ms: on CPU the wall time of the measured step (2 shared cores: indicative only); on CUDA
  the latency of a step, the median of RING_GPU_REPS steps each started together on every rank
  (barrier, synchronize), the slowest rank's.

The CPU blocks of the ring run on torch's CPU flash kernel (no [n, n] scores), so the memory a
rank needs falls as 1/W; the issue's goal: at N = 16K with 4 ranks, peak per rank <= 0.3x the
single-process fused attention's. Whole shards (chunks = 1) hold ~13 shard-sized buffers beyond
the outputs and gradients; `ring_c8_w<W>` (chunks = 8) holds ~13 / 8.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time


def _inputs(spec, rank, world):
    import torch
    from tritformer.distributed import _shard
    g = torch.Generator().manual_seed(0)
    B, H, N, D = spec["B"], spec["H"], spec["N"], spec["D"]
    dt = getattr(torch, spec["dtype"])
    device = spec.get("device", "cpu")
    full = [torch.randn(B, H, N, D, generator=g).to(dt) for _ in range(4)]  # q, k, v, dout
    if world > 1:
        full = [_shard(t, 2, rank, world, "zigzag").contiguous() for t in full]
    return [t.to(device) for t in full]


def worker(spec_path: str, rank, world, out_path: str) -> None:
    rank, world = int(rank), int(world)
    import torch
    import torch.distributed as dist
    from tritformer import distributed as cp
    with open(spec_path) as f:
        spec = json.load(f)
    device = spec.get("device", "cpu")
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    sent = [0]
    if spec["mode"] != "single":
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank,
                                world_size=world)
        exchange = cp._Ring.exchange

        def counted_exchange(self, send, recv, tag):  # bytes handed to the next rank
            sent[0] += sum(t.numel() * t.element_size() for t in send)
            return exchange(self, send, recv, tag)
        cp._Ring.exchange = counted_exchange
        a2a = dist.all_to_all_single

        def counted_a2a(out, inp, *a, **kw):  # the (W-1)/W of the input that leaves the rank
            sent[0] += inp.numel() * inp.element_size() * (world - 1) // world
            return a2a(out, inp, *a, **kw)
        dist.all_to_all_single = counted_a2a
    if spec.get("model"):
        step = _model_step(spec, rank, world)
    else:
        step = _attention_step(spec, rank, world)
    step()  # warm-up (first-call allocations, Gloo connections)
    if world > 1:
        dist.barrier()
    sent[0] = 0
    t0 = time.perf_counter()
    from tritformer.bench.core import peak_bytes  # the profiler measure every CPU row uses
    peak = peak_bytes(step, device)
    ms = (time.perf_counter() - t0) * 1e3
    sent_step = sent[0]
    if device == "cuda":
        ms = _gpu_latency(step, world)
    sent[0] = sent_step
    with open(out_path, "w") as f:
        json.dump({"rank": rank, "peak_bytes": peak, "sent_bytes": sent[0], "ms": ms}, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


RING_GPU_REPS = 10


def _gpu_latency(step, world) -> float:
    """Median ms of RING_GPU_REPS steps, each started on every rank at once (a fixed count: an
    adaptive one, as do_bench's, could differ between ranks and hang the collectives)."""
    import torch
    import torch.distributed as dist
    times = []
    for _ in range(RING_GPU_REPS):
        torch.cuda.synchronize()
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _model_step(spec, rank, world):
    """A GPT training step's forward + backward on this rank's shard of one sequence."""
    import torch
    from tritformer.distributed import _shard
    from tritformer.models import GPT, GPTConfig
    N = spec["N"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=N, vocab_size=256, n_layer=spec["layers"],
                          n_head=spec["H"], n_embd=spec["H"] * spec["D"],
                          attn_backend="tritformer", mlp_backend="torch"))
    if spec["mode"] != "single":
        model.set_context_parallel(None, mode=spec["mode"])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (spec["B"], N + 1), generator=g)
    idx, tgt = x[:, :-1], x[:, 1:]
    if world > 1 or spec["mode"] != "single":
        idx, tgt = (_shard(t, 1, rank, world, "zigzag").contiguous() for t in (idx, tgt))

    def step():
        _, loss = model(idx, tgt)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def _attention_step(spec, rank, world):
    from tritformer import distributed as cp
    q, k, v, dout = _inputs(spec, rank, world)
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def step():
        if spec["mode"] == "single":
            import tritformer
            out = tritformer.attention(*leaves, causal=True)
        else:
            if spec["mode"] == "ring":
                out = cp.ring_attention(*leaves, causal=True, layout="zigzag",
                                        chunks=spec.get("chunks", 1))
            else:
                out = cp.ulysses_attention(*leaves, causal=True, layout="zigzag")
        out.backward(dout)
        for t in leaves:
            t.grad = None
    return step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(spec: dict, world: int, timeout: float) -> dict:
    """One configuration on `world` processes; the per-rank maxima."""
    with tempfile.TemporaryDirectory(prefix="ring_memory_") as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
        env.pop("TRITON_INTERPRET", None)  # the CPU path (the interpreter at 16K takes hours)
        code = "import sys; from tritformer.bench.ring import worker; worker(*sys.argv[1:])"
        procs = [subprocess.Popen([sys.executable, "-c", code, spec_path, str(r), str(world),
                                   os.path.join(tmp, f"r{r}.json")], env=env)
                 for r in range(world)]
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise RuntimeError(f"{spec} on {world} process(es): no result in {timeout} s")
        if any(p.returncode for p in procs):
            raise RuntimeError(f"{spec} on {world} process(es) failed: "
                               f"{[p.returncode for p in procs]}")
        ranks = []
        for r in range(world):
            with open(os.path.join(tmp, f"r{r}.json")) as f:
                ranks.append(json.load(f))
    return {"peak_bytes": max(x["peak_bytes"] for x in ranks),
            "sent_bytes": max(x["sent_bytes"] for x in ranks),
            "ms": max(x["ms"] for x in ranks)}


# `bench --op ring`: on CPU B=1, H=4, D=64, fp32, causal, the quick sweep a few seconds per run;
# on CUDA B=1, H=16, D=128, bf16, causal, one GPU per rank (worlds up to the GPUs present)
RING_SWEEP = {True: ((2048,), (2, 4)), False: ((4096, 8192, 16384), (2, 4))}
RING_GPU_SWEEP = {True: ((16384,), (2, 4, 8)), False: ((16384, 65536, 131072), (2, 4, 8))}
RING_CHUNKS = 8  # the memory-lean ring's pieces per shard (provider ring_c8_w<W>)


def _ring_plan(device: str, quick: bool):
    """(shape, dtype, sequence lengths, world sizes) of the sweep on `device`."""
    if device == "cuda":
        import torch
        seqs, worlds = RING_GPU_SWEEP[quick]
        worlds = tuple(w for w in worlds if w <= torch.cuda.device_count())
        return dict(B=1, H=16, D=128), "bfloat16", seqs, worlds
    seqs, worlds = RING_SWEEP[quick]
    return dict(B=1, H=4, D=64), "float32", seqs, worlds


def _ring_providers(world: int) -> list:
    return [(f"ring_w{world}", "ring", 1), (f"ring_c{RING_CHUNKS}_w{world}", "ring", RING_CHUNKS),
            (f"ulysses_w{world}", "ulysses", 1)]


def ring_cases(device: str, quick: bool, providers: list[str]) -> int:
    if "tritformer" not in providers:
        return 0
    _, _, seqs, worlds = _ring_plan(device, quick)
    if not worlds:
        return 0
    return len(seqs) * (1 + sum(len(_ring_providers(w)) for w in worlds))


def bench_ring(device, quick, providers, emit, progress, skipped) -> None:
    """Rows: provider "tritformer" (one process, the whole sequence) and "ring_w<W>",
    "ring_c8_w<W>" (chunks = 8) and "ulysses_w<W>" (W processes, the maximum over ranks); metrics
    peak_memory (bytes per rank, fwd_bwd), comm_bytes (sent per rank per step) and latency. On
    CUDA: NCCL, one GPU per rank, worlds up to torch.cuda.device_count()."""
    if "tritformer" not in providers:
        skipped.setdefault("ring", "needs the tritformer provider")
        return
    shape, dtype, seqs, worlds = _ring_plan(device, quick)
    if not worlds:
        skipped.setdefault("ring", "context parallelism needs at least 2 GPUs (one per rank)")
        return
    B, H, D = shape["B"], shape["H"], shape["D"]
    cols = dict(batch=B, heads=H, head_dim=D, causal=True)
    dname = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    backend = "torch" if device == "cpu" else "triton"

    def row(provider, metric, value, n, ms):
        emit(dict(op="ring", provider=provider, backend=backend, mode="fwd_bwd", metric=metric,
                  unit="bytes", x_name="seqlen", x_value=n, value=value, **cols, dtype=dname))
        if metric == "peak_memory":
            emit(dict(op="ring", provider=provider, backend=backend, mode="fwd_bwd",
                      metric="latency", unit="ms", x_name="seqlen", x_value=n, value=ms, **cols,
                      dtype=dname))
    for n in seqs:
        base = dict(B=B, H=H, N=n, D=D, dtype=dtype, model=False, layers=0, device=device)
        progress(f"ring single N={n}")
        single = run(dict(base, mode="single"), 1, 900)
        row("tritformer", "peak_memory", single["peak_bytes"], n, single["ms"])
        for world in worlds:
            for provider, mode, chunks in _ring_providers(world):
                progress(f"ring {provider} N={n}")
                r = run(dict(base, mode=mode, chunks=chunks), world, 900)
                row(provider, "peak_memory", r["peak_bytes"], n, r["ms"])
                row(provider, "comm_bytes", r["sent_bytes"], n, r["ms"])


bench_ring.cases = ring_cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--world", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--mode", nargs="+", choices=("ring", "ulysses"), default=["ring"])
    p.add_argument("--chunks", type=int, nargs="+", default=[1, RING_CHUNKS],
                   help="ring_attention's chunks (pieces per shard) to measure")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: NCCL, one GPU per rank (attention steps only)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--model", type=int, default=0, metavar="LAYERS",
                   help="measure a whole GPT training step (forward + backward of a LAYERS-layer "
                        "byte-level GPT, width heads x head-dim, torch MLP) instead of one "
                        "attention call")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    rows = []
    what = (f"GPT training step ({args.model} layers, n_embd {args.heads * args.head_dim})"
            if args.model else "causal attention forward + backward")
    print(f"{what}, B={args.batch} H={args.heads} D={args.head_dim} "
          f"{'float32' if args.model else args.dtype}, CPU/Gloo, one thread per rank")
    if args.model and args.device == "cuda":
        p.error("--model measures on CPU only")
    print(f"{'N':>6} {'mode':>11} {'world':>5} {'peak MB/rank':>13} {'x single':>9} "
          f"{'sent MB/rank':>13} {'ms':>8}")
    for N in args.seq:
        base = dict(B=args.batch, H=args.heads, N=N, D=args.head_dim, dtype=args.dtype,
                    model=bool(args.model), layers=args.model, device=args.device)
        single = run(dict(base, mode="single"), 1, args.timeout)
        rows.append(dict(base, mode="single", world=1, **single, ratio=1.0))
        print(f"{N:>6} {'single':>11} {1:>5} {single['peak_bytes'] / 2**20:>13.1f} {1.0:>9.2f} "
              f"{0.0:>13.1f} {single['ms']:>8.0f}")
        variants = [(m, c) for m in args.mode for c in (args.chunks if m == "ring" else [1])]
        for mode, chunks in variants:
            for world in args.world:
                if (N // world) % 2 or (mode == "ulysses" and args.heads % world):
                    continue
                if chunks > N // world // 2:  # a zigzag run of N / (2 W) positions
                    continue
                r = run(dict(base, mode=mode, chunks=chunks), world, args.timeout)
                ratio = r["peak_bytes"] / single["peak_bytes"]
                rows.append(dict(base, mode=mode, chunks=chunks, world=world, **r, ratio=ratio))
                label = f"{mode} c{chunks}" if mode == "ring" and chunks > 1 else mode
                print(f"{N:>6} {label:>11} {world:>5} {r['peak_bytes'] / 2**20:>13.1f} "
                      f"{ratio:>9.2f} {r['sent_bytes'] / 2**20:>13.1f} {r['ms']:>8.0f}",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
