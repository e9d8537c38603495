"""`tritformer train` with context parallelism (--context-parallel, ring / Ulysses), FSDP2
(--fsdp) and torch.distributed.checkpoint (DCP) checkpoints, on Gloo CPU processes.

- 4 ranks, CP 2 x DP 2, FSDP (the issue's command): one step equals the single-process step on
  the same global batch; its DCP checkpoint loads into a plain model (world 1).
- resume on a different world size: that 4-rank checkpoint continues on 1 process (in this
  process) and on 2 ranks (CP 2 with Ulysses, DDP), each step equal to the single-process step
  from the loaded model and optimiser state.
- deadlock guard: every spawn has a deadline (the ranks are killed and the test fails), and the
  ranks' collectives a timeout (TRITFORMER_DIST_TIMEOUT): a rank waiting for a peer that never
  comes fails instead of hanging.

The ranks run without TRITON_INTERPRET (the torch fallback; the ring's blocks on torch's CPU
flash kernel) and the tiny GPT's attention / MLP backends are "naive" / "torch", so the
single-process references here run plain PyTorch too: the kernels across ranks are
tests/test_distributed.py's subject.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from tritformer import cli, train
from tritformer.models import GPT

pytestmark = pytest.mark.integration  # spawned, model-level (pyproject.toml)

# seconds for one spawn (all ranks). Measured on 2 busy cores: 15-30 s for the 4-rank run, the
# whole file 35-70 s wall (42 s CPU)
TIMEOUT = 240
TINY = ["--block-size", "32", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
        "--attn-backend", "naive", "--mlp-backend", "torch"]
COMMON = ["--batch-size", "2", "--warmup", "0", "--eval-interval", "0", "--eval-iters", "1",
          "--seed", "3", *TINY]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~40 KB of this package's own source."""
    text = b""
    for name in ("train.py", "distributed.py"):
        with open(os.path.join(os.path.dirname(train.__file__), name), "rb") as f:
            text += f.read()
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes(text[:40_000])
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, argv, *, ranks=None, timeout: float = TIMEOUT, dist_timeout: float = 120):
    """`python -m tritformer train argv` on `world` Gloo ranks, as torchrun would start them
    (RANK, WORLD_SIZE, MASTER_ADDR/PORT), without torchrun's agent; `ranks`: start only these.
    Returns (returncodes, logs). Past `timeout` seconds every rank is killed and the test fails:
    a hung collective cannot hang the suite."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), TRITFORMER_DIST_TIMEOUT=str(dist_timeout))
    env.pop("TRITON_INTERPRET", None)
    procs = [subprocess.Popen([sys.executable, "-m", "tritformer", "train", *argv],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (range(world) if ranks is None else ranks)]
    deadline = time.monotonic() + timeout
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{world}-rank train did not finish in {timeout} s (hung collective?)\n"
                    + "\n".join(p.communicate()[0][-2000:] for p in procs))
    return [p.returncode for p in procs], logs


def _ok(codes, logs):
    for r, (c, log) in enumerate(zip(codes, logs)):
        assert c == 0, f"rank {r} exited with {c}:\n{log[-4000:]}"


def _args(*argv):
    return cli._parser().parse_args(["train", *argv])


def _global_batch(corpus, args, step, dp):
    """The rows the dp data-parallel groups draw at `step`, concatenated."""
    data = train.load_corpus(corpus)
    rows = [train.Shards(data, 32, args.val_fraction, d, dp, args.seed).batch("train", step, 2)
            for d in range(dp)]
    return torch.cat([b[0] for b in rows]), torch.cat([b[1] for b in rows])


def _assert_same_params(got: dict, want: dict, before: dict, what: str):
    for name, p in want.items():
        diff = (got[name] - p).abs().max()
        moved = (p - before[name]).abs().max()
        # Adam moves a parameter by ~lr (1e-3) per step; the runs differ by the gradient
        # reductions' rounding only
        assert diff <= 2e-6, f"{what}: {name} differs by {diff:.2e} (the step moved it {moved:.2e})"
    assert any((p - before[n]).abs().max() > 1e-4 for n, p in want.items())  # it did move


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def fsdp_run(corpus, run_once):
    """torchrun --nproc_per_node=4 -m tritformer train --context-parallel 2 --fsdp, 1 step (once
    per session; the tests copy the run directory before changing it)."""
    def produce(work):
        out = work / "out"
        argv = ["--data", corpus, "--steps", "1", "--out", str(out), "--context-parallel", "2",
                "--fsdp", *COMMON]
        codes, logs = launch(4, argv)
        _ok(codes, logs)
        return argv, str(out), logs[0]
    argv, out, log = run_once("fsdp", produce)
    return argv, pathlib.Path(out), log


def test_cp_x_dp_fsdp_step_equals_the_single_process_step(corpus, fsdp_run):
    argv, out, log = fsdp_run
    assert "FSDP, context parallel 2 (ring) x data parallel 2" in log, log
    assert "global batch 4 x 32" in log, log
    assert os.path.isfile(out / "ckpt_dcp" / "train_state.json")
    args = _args(*argv)
    config = train.model_config(args, None)
    torch.manual_seed(args.seed)
    single = GPT(config)
    init = _state(single)
    opt = train.make_optimizer(single, args)
    x, y = _global_batch(corpus, args, 0, dp=2)
    train.train_step(single, opt, x, y, train.lr_at(0, args), args.grad_clip)
    # the sharded checkpoint, read back by one process without a process group
    loaded = GPT(config)
    meta = train.load_dcp_checkpoint(str(out / "ckpt_dcp"), loaded)
    assert meta["step"] == 1 and meta["world_size"] == 4 and meta["config"] == config.to_dict()
    _assert_same_params(_state(loaded), _state(single), init, "4-rank CP x DP FSDP vs 1 process")
    # tied embedding stays tied through the DCP round trip
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    # the gathered whole model in ckpt.pt, for generate (no optimiser state)
    whole = train.load_checkpoint(str(out / "ckpt.pt"), GPT(config))
    assert whole["step"] == 1 and "optimizer" not in whole
    for name, p in _state(loaded).items():
        assert torch.equal(whole["model"][name], p), name


def test_generate_reads_the_dcp_checkpoint(fsdp_run, tmp_path):
    # `generate --checkpoint` on the sharded ckpt_dcp/ itself, and on a run folder whose
    # ckpt_dcp is the further on: the same weights as the gathered ckpt.pt, the same text
    from tritformer import generate
    _, out, _ = fsdp_run
    whole, _, _ = generate.load_model(str(out / "ckpt.pt"), attn_backend="sdpa")
    here = tmp_path / "run"
    shutil.copytree(out, here)
    os.remove(here / "ckpt.pt")  # only the DCP shards left
    for path in (here / "ckpt_dcp", here):
        model, encode, _ = generate.load_model(str(path), attn_backend="sdpa")
        for name, p in _state(whole).items():
            assert torch.equal(_state(model)[name], p), (path, name)
        idx = torch.tensor([encode("ab")])
        assert torch.equal(model.generate(idx, 8, temperature=0.0),
                           whole.generate(idx, 8, temperature=0.0))


def _expected_next_step(corpus, argv, dcp_dir, dp):
    """The model and optimiser state loaded from `dcp_dir`, one more single-process step on the
    global batch of step 1 with dp data-parallel groups: (before, after) parameters."""
    args = _args(*argv, "--steps", "2")  # the resumed runs' schedule
    config = train.model_config(args, None)
    model = GPT(config)
    opt = train.make_optimizer(model, args)
    train.load_dcp_checkpoint(str(dcp_dir), model, opt)
    before = _state(model)
    x, y = _global_batch(corpus, args, 1, dp=dp)
    train.train_step(model, opt, x, y, train.lr_at(1, args), args.grad_clip)
    return before, _state(model), opt


def test_fsdp_checkpoint_resumes_on_one_process(corpus, fsdp_run, tmp_path):
    argv, out, _ = fsdp_run
    here = tmp_path / "one"
    shutil.copytree(out, here)
    resumed = [a if a != str(out) else str(here) for a in argv if a != "--fsdp"]
    i = resumed.index("--context-parallel")
    del resumed[i:i + 2]
    before, want, opt = _expected_next_step(corpus, argv, here / "ckpt_dcp", dp=1)
    assert train.main(_args(*resumed, "--resume", "--steps", "2")) == 0
    ckpt = torch.load(here / "ckpt.pt", weights_only=True)  # a plain run writes ckpt.pt
    assert ckpt["step"] == 2 and [r["step"] for r in ckpt["log"]] == [1, 2]
    _assert_same_params(ckpt["model"], want, before, "4-rank checkpoint resumed on 1 process")
    steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {2}, steps  # AdamW's state came from the checkpoint, not a fresh start
    # --resume now takes ckpt.pt (step 2), not the older ckpt_dcp (step 1)
    assert train.find_resume(str(here))["step"] == 2 and "dcp" not in train.find_resume(str(here))


def test_fsdp_checkpoint_resumes_on_two_ranks_with_ulysses(corpus, fsdp_run, tmp_path):
    argv, out, _ = fsdp_run
    here = tmp_path / "two"
    shutil.copytree(out, here)
    resumed = [a if a != str(out) else str(here) for a in argv if a != "--fsdp"]
    codes, logs = launch(2, [*resumed, "--cp-mode", "ulysses", "--resume", "--steps", "2"])
    _ok(codes, logs)
    assert "DDP, context parallel 2 (ulysses) x data parallel 1" in logs[0], logs[0]
    assert "resuming at step 1" in logs[0], logs[0]
    before, want, _ = _expected_next_step(corpus, argv, here / "ckpt_dcp", dp=1)
    ckpt = torch.load(here / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2
    _assert_same_params(ckpt["model"], want, before, "4-rank checkpoint resumed on 2 CP ranks")


def test_a_missing_rank_fails_within_the_timeout(corpus, tmp_path):
    # rank 1 never starts: rank 0 must give up after TRITFORMER_DIST_TIMEOUT, not hang
    t0 = time.monotonic()
    codes, logs = launch(2, ["--data", corpus, "--steps", "1", "--out", str(tmp_path / "o"),
                             *COMMON], ranks=[0], timeout=90, dist_timeout=5)
    assert codes[0] != 0, logs[0][-2000:]
    assert time.monotonic() - t0 < 60


def test_parallel_arguments_are_checked_before_any_process_waits():
    config = train.model_config(_args(*TINY), None)
    for argv, world, match in [
        (["--context-parallel", "3"], 4, "must divide the number of processes 4"),
        (["--context-parallel", "4", "--cp-mode", "ulysses"], 4, "--n-head 2 must be divisible"),
        (["--context-parallel", "4"], 6, "must divide the number of processes 6"),
    ]:
        with pytest.raises(ValueError, match=match):
            train.check_parallel(_args(*argv), config, world)
    odd = train.model_config(_args(*TINY, "--block-size", "36"), None)
    with pytest.raises(ValueError, match="divisible by 8"):
        train.check_parallel(_args("--context-parallel", "4"), odd, 4)
    drop = train.model_config(_args(*TINY, "--dropout", "0.1"), None)
    with pytest.raises(ValueError, match="dropout must be 0"):
        train.check_parallel(_args("--context-parallel", "2"), drop, 2)
    with pytest.raises(ValueError, match="--context-parallel must be >= 1"):
        train.check_args(_args("--context-parallel", "0"))


@pytest.mark.parametrize("Hkv, nq, nk, right", [(2, 16, 16, 0), (1, 8, 16, None), (2, 16, 8, None)])
def test_ring_cpu_blocks_on_torch_flash_match_the_reference(Hkv, nq, nk, right):
    # the ring's CPU block path (torch's flash kernel, GQA by repeated heads, backward from the
    # global out / lse) against its fp32 reference path, on one block (its own out / lse)
    from tritformer import distributed as cp
    g = torch.Generator().manual_seed(Hkv * 100 + nq + nk)
    q = torch.randn(2, 4, nq, 16, generator=g)
    k, v = (torch.randn(2, Hkv, nk, 16, generator=g) for _ in range(2))
    do = torch.randn(2, 4, nq, 16, generator=g)
    assert cp._cpu_flash(q, k, None, right, 0.0)
    out, lse = cp._block_fwd(q, k, v, 0.25, None, right, 0.0, True)
    ref_out, ref_lse = cp.reference._attention(q, k, v, 0.25, None, right, True, softcap=0.0)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    got = cp._block_bwd(do, q, k, v, out, lse, None, 0.25, None, right, 0.0, True)
    # dlse = 0 (not None) takes the reference path's autograd chain rule
    want = cp._block_bwd(do, q, k, v, out, lse, torch.zeros_like(lse), 0.25, None, right, 0.0, True)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
