"""`--op ring`: context-parallel attention on CPU (Gloo): peak memory per rank and communication
per step, against one process over the whole sequence.

    python -m tritformer bench --op ring [--quick]                     # rows like every op's
    python benchmarks/ring_memory.py                                  # N 4K 8K 16K x world 1 2 4
    python benchmarks/ring_memory.py --seq 16384 --world 4 --mode ring ulysses --json out.json

For each total sequence length N and world size W, W processes (Gloo, one thread each) hold
their zigzag shard [B, H, N/W, D] of q, k, v and run one causal attention forward + backward
(`tritformer.distributed.ring_attention` or `ulysses_attention`); the baseline is one process
running `tritformer.attention` over the whole sequence (on CPU: the torch fallback, PyTorch's
flash SDPA kernel, O(N) memory). Reported per rank (the maximum over ranks):

- peak_mb: the peak of the bytes allocated during forward + backward beyond what was live before
  (outputs, lse, gradients, received shards, accumulators, temporaries; the inputs are not
  counted), from the PyTorch profiler's memory events, as `tritformer.bench` measures CPU peaks.
- comm_mb: bytes this rank sends in one step (forward + backward): ring: the k/v shards it passes
  on (W-1 hops forward, W-1 backward) and the fp32 dK/dV accumulators (W hops); Ulysses: the
  all-to-all bytes that leave the rank (q, k, v and the output forward, their gradients back).
- ms: wall time of the step on this machine (2 shared cores: indicative only).

The CPU blocks of the ring run on torch's CPU flash kernel (no [n, n] scores), so the memory a
rank needs falls as 1/W; the issue's goal: at N = 16K with 4 ranks, peak per rank <= 0.3x the
single-process fused attention's.
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
    full = [torch.randn(B, H, N, D, generator=g, dtype=dt) for _ in range(4)]  # q, k, v, dout
    if world == 1:
        return full
    return [_shard(t, 2, rank, world, "zigzag").contiguous() for t in full]


def worker(spec_path: str, rank, world, out_path: str) -> None:
    rank, world = int(rank), int(world)
    import torch
    import torch.distributed as dist
    from tritformer import distributed as cp
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(1)
    sent = [0]
    if spec["mode"] != "single":
        dist.init_process_group("gloo", rank=rank, world_size=world)
        shift = cp._Ring.shift

        def counted_shift(self, tensors, tag):  # bytes handed to the next rank
            sent[0] += sum(t.numel() * t.element_size() for t in tensors)
            return shift(self, tensors, tag)
        cp._Ring.shift = counted_shift
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
    peak = peak_bytes(step, "cpu")
    ms = (time.perf_counter() - t0) * 1e3
    with open(out_path, "w") as f:
        json.dump({"rank": rank, "peak_bytes": peak, "sent_bytes": sent[0], "ms": ms}, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


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
            fn = cp.ring_attention if spec["mode"] == "ring" else cp.ulysses_attention
            out = fn(*leaves, causal=True, layout="zigzag")
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


# `bench --op ring`: B=1, H=4, D=64, fp32, causal; the quick sweep keeps a few seconds per run
RING_SWEEP = {True: ((2048,), (2, 4)), False: ((4096, 8192, 16384), (2, 4))}
RING_MODES = ("ring", "ulysses")


def ring_cases(device: str, quick: bool, providers: list[str]) -> int:
    if device == "cuda" or "tritformer" not in providers:
        return 0
    seqs, worlds = RING_SWEEP[quick]
    return len(seqs) * (1 + len(RING_MODES) * len(worlds))


def bench_ring(device, quick, providers, emit, progress, skipped) -> None:
    """Rows: provider "tritformer" (one process, the whole sequence) and "ring_w<W>" /
    "ulysses_w<W>" (W Gloo processes, the maximum over ranks); metrics peak_memory (bytes per
    rank, fwd_bwd) and comm_bytes (sent per rank per step)."""
    if device == "cuda":
        skipped.setdefault("ring", "measures CPU / Gloo memory per rank; GPU latency over NCCL is "
                                   "not built (python -m tritformer.bench.ring on CPU)")
        return
    if "tritformer" not in providers:
        skipped.setdefault("ring", "needs the tritformer provider")
        return
    B, H, D = 1, 4, 64
    seqs, worlds = RING_SWEEP[quick]
    shape = dict(batch=B, heads=H, head_dim=D, causal=True)

    def row(provider, metric, value, n, ms):
        emit(dict(op="ring", provider=provider, backend="torch", mode="fwd_bwd", metric=metric,
                  unit="bytes", x_name="seqlen", x_value=n, value=value, **shape, dtype="fp32"))
        if metric == "peak_memory":
            emit(dict(op="ring", provider=provider, backend="torch", mode="fwd_bwd",
                      metric="latency", unit="ms", x_name="seqlen", x_value=n, value=ms, **shape,
                      dtype="fp32"))
    for n in seqs:
        base = dict(B=B, H=H, N=n, D=D, dtype="float32", model=False, layers=0)
        progress(f"ring single N={n}")
        single = run(dict(base, mode="single"), 1, 900)
        row("tritformer", "peak_memory", single["peak_bytes"], n, single["ms"])
        for mode in RING_MODES:
            for world in worlds:
                progress(f"ring {mode} W={world} N={n}")
                r = run(dict(base, mode=mode), world, 900)
                row(f"{mode}_w{world}", "peak_memory", r["peak_bytes"], n, r["ms"])
                row(f"{mode}_w{world}", "comm_bytes", r["sent_bytes"], n, r["ms"])


bench_ring.cases = ring_cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--world", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--mode", nargs="+", choices=("ring", "ulysses"), default=["ring"])
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
    print(f"{'N':>6} {'mode':>8} {'world':>5} {'peak MB/rank':>13} {'x single':>9} "
          f"{'sent MB/rank':>13} {'ms':>8}")
    for N in args.seq:
        base = dict(B=args.batch, H=args.heads, N=N, D=args.head_dim, dtype=args.dtype,
                    model=bool(args.model), layers=args.model)
        single = run(dict(base, mode="single"), 1, args.timeout)
        rows.append(dict(base, mode="single", world=1, **single, ratio=1.0))
        print(f"{N:>6} {'single':>8} {1:>5} {single['peak_bytes'] / 2**20:>13.1f} {1.0:>9.2f} "
              f"{0.0:>13.1f} {single['ms']:>8.0f}")
        for mode in args.mode:
            for world in args.world:
                if (N // world) % 2 or (mode == "ulysses" and args.heads % world):
                    continue
                r = run(dict(base, mode=mode), world, args.timeout)
                ratio = r["peak_bytes"] / single["peak_bytes"]
                rows.append(dict(base, mode=mode, world=world, **r, ratio=ratio))
                print(f"{N:>6} {mode:>8} {world:>5} {r['peak_bytes'] / 2**20:>13.1f} "
                      f"{ratio:>9.2f} {r['sent_bytes'] / 2**20:>13.1f} {r['ms']:>8.0f}",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
