"""`python -m tritformer train`: byte-level GPT language modelling, one process or many (DDP).

Data: the bytes of a text file or of every file under a folder (vocabulary 256, no tokenizer).
With no --data the corpus is the Python standard library's own source (`*.py` under
``sysconfig.get_paths()["stdlib"]``), present on every machine, so training runs offline.
The last --val-fraction of the bytes is the validation split.

Many processes: ``torchrun --nproc_per_node=N -m tritformer train ...`` initialises
torch.distributed (NCCL on GPUs, Gloo on CPU) and wraps the model in DDP. The training bytes are
cut into N contiguous shards; rank r draws its --batch-size rows from shard r only, so the global
batch is N x --batch-size rows. DDP averages the gradients, i.e. one step equals a single
process's step on the concatenated global batch (tests/test_train.py checks this). Only rank 0
prints, logs and writes checkpoints.

Context parallelism (``--context-parallel CP``, ``--cp-mode ring|ulysses``): the N ranks form
N / CP data-parallel groups of CP consecutive ranks (ranks d*CP .. d*CP+CP-1; a CP group should
sit on one node, its ranks talk every layer). The ranks of a group draw the same rows (data
shard d of N / CP) and each keeps its zigzag shard of every row's block_size bytes
(`tritformer.distributed.shard_sequence`); the GPT runs every attention layer as
`ring_attention` / `ulysses_attention` over the group (`GPT.set_context_parallel`). Each rank's
loss is its tokens' cross-entropy sum x CP / the group's token count, so the mean over all N
ranks is the global batch's mean loss and DDP's (or FSDP's) gradient average over all N ranks
is the global batch's gradient: one step equals the single-process step on the global batch
(tests/test_distributed_train.py). The logged train loss is that mean over all ranks.

``--fsdp``: FSDP2 (`torch.distributed.fsdp.fully_shard`, each block and the root) shards the
parameters, gradients and AdamW state over all N ranks (one 1-D mesh: with CP the sequence
shards and the data shards share it, gradients reduce-scattered with the same average as DDP's).
Its checkpoint is a torch.distributed.checkpoint directory, OUT/ckpt_dcp (every rank writes its
shards; train_state.json beside them holds step, config, args and log), which `--resume` loads
on any number of processes, with or without --fsdp or CP (DCP reshards); it is written to
OUT/ckpt_dcp.tmp and renamed. At the end rank 0 also writes the gathered whole model to ckpt.pt
(no optimiser state) for `generate`. --resume takes whichever of ckpt.pt and ckpt_dcp is
further on (ckpt_dcp on a tie).

Schedule: AdamW (betas 0.9/0.95, weight decay on matrices only), gradient clipping, learning rate
warm-up then cosine decay to --min-lr (nanoGPT's). Batches are a function of (seed, step, rank),
so a resumed run sees exactly the batches the uninterrupted one would have.

Output in --out: ckpt.pt (model, optimiser, step, config, args; written atomically; plain types
only, read back with torch.load(weights_only=True), see `load_checkpoint`), log.csv
(step, lr, train loss, val loss, tokens/s) and loss.png (train/val curves).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import datetime
import json
import math
import os
import pickle
import re
import shutil
import sys
import sysconfig
import time
import warnings
from typing import Optional

import torch
from torch import nn

from ._cliargs import (CKPT_NAME, DCP_NAME, MODEL_DEFAULTS,  # noqa: F401 (re-exported)
                       WARMUP_MAX_FRACTION,
                       add_train_arguments as add_arguments, train_bool as _bool)
from .models.gpt import GPT, GPTConfig
from .progress import ProgressBar, format_seconds

MODEL_ARGS = ("block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "attn_backend",
              "mlp_backend")
# fields that change the parameters (a checkpoint cannot be loaded into a model differing in these)
SHAPE_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias")


def check_args(args) -> None:
    for name in ("steps", "batch_size", "eval_iters", "log_interval", "ckpt_interval"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup", "eval_interval", "max_bytes"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0.0 < args.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if not (args.lr > 0 and args.min_lr >= 0):
        raise ValueError(f"--lr must be > 0 and --min-lr >= 0, got {args.lr}, {args.min_lr}")
    if getattr(args, "context_parallel", 1) < 1:
        raise ValueError(f"--context-parallel must be >= 1, got {args.context_parallel}")


def check_parallel(args, config: GPTConfig, world: int) -> None:
    """--context-parallel against the world size and the model (before any process waits)."""
    cp = args.context_parallel
    if world % cp:
        raise ValueError(f"--context-parallel {cp} must divide the number of processes {world} "
                         "(torchrun --nproc_per_node)")
    if cp == 1:
        return
    if config.block_size % (2 * cp):
        raise ValueError(f"--context-parallel {cp}: --block-size {config.block_size} must be "
                         f"divisible by {2 * cp} (each rank holds two equal zigzag chunks)")
    if args.cp_mode == "ulysses" and config.n_head % cp:
        raise ValueError(f"--cp-mode ulysses: --n-head {config.n_head} must be divisible by "
                         f"--context-parallel {cp} (or use --cp-mode ring)")
    if config.dropout:
        raise ValueError(f"--context-parallel {cp}: --dropout must be 0 (attention dropout does "
                         f"not shard across ranks), got {config.dropout}")


def clamp_warmup(args) -> Optional[str]:
    """Clamp args.warmup to WARMUP_MAX_FRACTION of args.steps (a run that is mostly warm-up
    never reaches its learning rate); returns the note to print when it did, else None."""
    limit = math.ceil(args.steps * WARMUP_MAX_FRACTION)  # rounded up: a short run warms up too
    if args.warmup <= limit:
        return None
    note = (f"note: --warmup {args.warmup} is more than {WARMUP_MAX_FRACTION:.0%} of --steps "
            f"{args.steps}; warming up over {limit} step{'s' if limit != 1 else ''} instead")
    args.warmup = limit
    return note


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def default_corpus() -> str:
    return sysconfig.get_paths()["stdlib"]


def load_corpus(path: Optional[str], max_bytes: int = 0) -> bytes:
    """The training bytes: a file's contents, or every regular file under a folder in sorted
    order (the default corpus: only *.py). max_bytes > 0 truncates."""
    default = path is None
    path = default_corpus() if default else path
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data: {path!r} does not exist")
    if os.path.isfile(path):
        files = [path]
    else:
        files = []
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                             and not (default and d in ("site-packages", "dist-packages", "__pycache__")))
            files += [os.path.join(root, n) for n in sorted(names)
                      if not n.startswith(".") and (not default or n.endswith(".py"))]
    chunks, total = [], 0
    for f in files:
        if max_bytes and total >= max_bytes:
            break
        try:
            with open(f, "rb") as fh:
                b = fh.read(max_bytes - total if max_bytes else -1)
        except OSError:
            continue  # unreadable file (permissions, broken link): skip
        chunks.append(b)
        total += len(b)
    data = b"".join(chunks)
    if not data:
        raise ValueError(f"--data: {path!r} is empty (no bytes to train on)")
    return data


class Shards:
    """Train/val byte tokens and the batch of each (step, rank): rank r of `world` samples only
    from the r-th contiguous shard of the split."""

    def __init__(self, data: bytes, block_size: int, val_fraction: float, rank: int, world: int,
                 seed: int):
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        n_val = max(int(len(tokens) * val_fraction), block_size + 1)
        self.train, self.val = tokens[:-n_val], tokens[-n_val:]
        self.block, self.rank, self.world, self.seed = block_size, rank, world, seed
        need = world * (block_size + 1)
        if len(self.train) < need or len(self.val) < block_size + 1:
            raise ValueError(f"--data: the corpus has {len(tokens)} bytes, too few for block_size "
                             f"{block_size} with {world} process(es) (train needs >= {need} bytes "
                             f"and validation >= {block_size + 1})")

    def _shard(self, split: str, rank: int) -> torch.Tensor:
        t = self.train if split == "train" else self.val
        if split == "val":
            return t  # every rank estimates on the whole validation split (different rows)
        n = len(t) // self.world
        return t[rank * n:(rank + 1) * n]

    def batch(self, split: str, step: int, rows: int, rank: Optional[int] = None):
        """x, y [rows, block] int64 for this step: a function of (seed, split, step, rank) only."""
        rank = self.rank if rank is None else rank
        shard = self._shard(split, rank)
        g = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + step * 8191 + rank * 131 + (split == "val")) % (2 ** 63))
        ix = torch.randint(len(shard) - self.block, (rows,), generator=g)
        x = torch.stack([shard[i:i + self.block] for i in ix.tolist()]).long()
        y = torch.stack([shard[i + 1:i + 1 + self.block] for i in ix.tolist()]).long()
        return x, y


# ---------------------------------------------------------------------------------------------
# Model, optimiser, schedule
# ---------------------------------------------------------------------------------------------
def lr_at(step: int, args) -> float:
    """Linear warm-up to --lr over --warmup steps, then cosine decay to --min-lr at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / (args.warmup + 1)
    span = max(args.steps - args.warmup, 1)
    ratio = min((step - args.warmup) / span, 1.0)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


def make_optimizer(model: nn.Module, args) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (Linear/Embedding weights) only, as nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x, y, lr: float, grad_clip: float,
               autocast_dtype: Optional[torch.dtype] = None) -> float:
    """One optimiser step on (x, y); returns the (local) loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        _, loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return float(loss.detach())


def model_config(args, ckpt_config: Optional[dict]) -> GPTConfig:
    """The run's GPTConfig: explicit flags over the checkpoint's config over the defaults; a
    flag that contradicts the checkpoint's shape is an error."""
    base = dict(MODEL_DEFAULTS, vocab_size=256)
    if ckpt_config is not None:
        base.update(ckpt_config)
    for name in MODEL_ARGS:
        value = getattr(args, name)
        if value is None:
            continue
        if ckpt_config is not None and name in SHAPE_FIELDS and ckpt_config.get(name) != value:
            raise ValueError(f"the checkpoint's config does not match the model requested: "
                             f"{name}={ckpt_config.get(name)!r} in the checkpoint, --"
                             f"{name.replace('_', '-')} {value!r} given")
        base[name] = value
    return GPTConfig.from_dict(base)


def load_checkpoint(path: str, model: Optional[GPT] = None, map_location="cpu"):
    """Read a checkpoint written by `train` (dict with model, optimizer, step, config, args).

    The file is read with ``torch.load(weights_only=True)``: tensors, dicts, lists, tuples,
    numbers, strings, bools and None only, so a checkpoint from someone else cannot run code
    while it loads; anything else (a pickled object or callable) is a ValueError naming the file.
    With `model`: load its weights after checking that the checkpoint's config matches the
    model's (every field that shapes the parameters); returns the checkpoint dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's weights-only unpickler refused the file
        msg = str(e)
        found = re.search(r"GLOBAL (\S+)", msg)
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", msg)
        what = (f"it holds a pickled {found.group(1)}" if found else
                f"torch.load: {detail.group(1).strip()[:200]}" if detail else
                f"torch.load: {_first_line(e)}")
        raise ValueError(
            f"{path!r} is not a plain-type tritformer checkpoint ({what}). Checkpoints are read "
            "with torch.load(weights_only=True), which refuses pickled objects: they could run "
            "code on load. A checkpoint written by an older tritformer or by another tool: "
            "re-save it as plain types (tensors, dicts, lists, numbers, strings) from a copy you "
            "trust, or retrain") from None
    except (RuntimeError, EOFError) as e:
        if isinstance(e, RuntimeError) and "PytorchStreamReader" not in str(e):
            raise  # not the file's fault (a map_location without that device, ...)
        # a truncated file, a zip archive that is not one
        raise ValueError(f"{path!r} is not a readable tritformer checkpoint (torch.load: "
                         f"{_first_line(e)})") from None
    problem = _layout_problem(ckpt)
    if problem:
        raise ValueError(f"{path!r} is not a tritformer training checkpoint ({problem})")
    if model is not None:
        have = model.config.to_dict()
        diff = [f"{k}: checkpoint {ckpt['config'].get(k)!r}, model {have[k]!r}"
                for k in SHAPE_FIELDS if ckpt["config"].get(k) != have[k]]
        if diff:
            raise ValueError("the checkpoint's config does not match the model: " + "; ".join(diff))
        model.load_state_dict(ckpt["model"])
    return ckpt


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _layout_problem(ckpt) -> Optional[str]:
    """What keeps a loaded object from being a training checkpoint, or None."""
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        return "no model/config"
    if not isinstance(ckpt["config"], dict) or not all(isinstance(k, str) for k in ckpt["config"]):
        return "config is not a dict of fields"
    if not isinstance(ckpt["model"], dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()):
        return "model is not a state dict of tensors"
    if "step" in ckpt and (isinstance(ckpt["step"], bool) or not isinstance(ckpt["step"], int)):
        return f"step is {type(ckpt['step']).__name__}, not int"
    for name, kind in (("optimizer", dict), ("args", dict), ("log", list)):
        if name in ckpt and not isinstance(ckpt[name], kind):
            return f"{name} is {type(ckpt[name]).__name__}, not {kind.__name__}"
    return None


def plain(obj, where: str = "checkpoint"):
    """`obj` as the plain types `load_checkpoint` accepts: tensors, dicts (str/int keys), lists,
    tuples, None, bool, int, float, str (a state dict stays an OrderedDict). Converts what has a
    plain equivalent (argparse.Namespace -> dict, path -> str, numpy scalar -> int/float/bool,
    torch.dtype/device -> str, tuple and str/int/float subclasses -> the base type); anything
    else is a TypeError naming `where`."""
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj if type(obj) in (torch.Tensor, nn.Parameter) else obj.as_subclass(torch.Tensor)
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        # a state dict stays an OrderedDict with its per-module versions (weights_only reads both)
        out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            key = plain(k, f"{where} key {k!r}")
            if type(key) not in (str, int):
                raise TypeError(f"{where}: key {k!r} ({type(k).__name__}) is not a str or int")
            out[key] = plain(v, f"{where}.{k}")
        if isinstance(out, collections.OrderedDict) and hasattr(obj, "_metadata"):
            out._metadata = plain(obj._metadata, f"{where}._metadata")
        return out
    if isinstance(obj, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, os.PathLike):
        return os.fsdecode(obj)
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if type(obj).__module__ == "numpy" and callable(getattr(obj, "item", None)) \
            and getattr(obj, "shape", None) == ():
        return plain(obj.item(), where)  # a numpy scalar (0-d array too)
    for base in (bool, int, float, str):  # IntEnum, str subclasses, ...
        if isinstance(obj, base):
            return base(obj)
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be "
                    "written to a plain-type checkpoint (tensors, dicts, lists, numbers, strings, "
                    "bools, None)")


def _save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(plain(obj), tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous checkpoint


DCP_META = "train_state.json"


def read_dcp_meta(path: str) -> dict:
    """step, config, args, log of a DCP checkpoint directory (`--fsdp`), with "dcp": path."""
    meta_path = os.path.join(path, DCP_META)
    if not os.path.isfile(meta_path):
        raise ValueError(f"{path!r} is not a tritformer DCP checkpoint (no {DCP_META})")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) \
            or not isinstance(meta.get("step"), int):
        raise ValueError(f"{meta_path!r} is not a tritformer training state (no config/step)")
    return dict(meta, dcp=path)


@contextlib.contextmanager
def _quiet_dcp():
    with warnings.catch_warnings():
        # one process, no process group: DCP says it assumes a single-process load/save (it is)
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* single process")
        yield


def save_dcp_checkpoint(model: nn.Module, opt, meta: Optional[dict], out: str) -> str:
    """Every rank: write the model and optimiser (FSDP shards or whole tensors) to OUT/ckpt_dcp
    with torch.distributed.checkpoint; the rank passing `meta` (rank 0) writes train_state.json.
    Written to ckpt_dcp.tmp, then renamed: a crash mid-write leaves the previous checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    dist_on = torch.distributed.is_initialized()
    final = os.path.join(out, DCP_NAME)
    tmp, old = final + ".tmp", final + ".old"
    if meta is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    if dist_on:
        torch.distributed.barrier()  # nobody writes into tmp before rank 0 cleared it
    msd, osd = get_state_dict(model, opt)
    with _quiet_dcp():
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    if meta is not None:
        with open(os.path.join(tmp, DCP_META), "w", encoding="utf-8") as f:
            json.dump(meta, f)
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    if dist_on:
        torch.distributed.barrier()
    return final


def load_dcp_checkpoint(path: str, model: nn.Module, opt=None) -> dict:
    """Load a DCP checkpoint (`save_dcp_checkpoint`) into `model` (and `opt`): a plain, DDP or
    FSDP2 model on any number of processes (DCP reshards). Every rank calls it; returns the
    training state (step, config, log, ...). The config must match the model's shape."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as dsd
    meta = read_dcp_meta(path)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        have = cfg.to_dict()
        diff = [f"{k}: checkpoint {meta['config'].get(k)!r}, model {have[k]!r}"
                for k in SHAPE_FIELDS if meta["config"].get(k) != have[k]]
        if diff:
            raise ValueError("the checkpoint's config does not match the model: " + "; ".join(diff))
    with _quiet_dcp():
        if opt is None:
            state = {"model": dsd.get_model_state_dict(model)}
            dcp.load(state, checkpoint_id=path)
            dsd.set_model_state_dict(model, state["model"])
        else:
            msd, osd = dsd.get_state_dict(model, opt)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=path)
            dsd.set_state_dict(model, opt, model_state_dict=state["model"],
                               optim_state_dict=state["optim"])
    return meta


def find_resume(out: str):
    """The checkpoint `--resume` continues: OUT/ckpt_dcp's training state (with "dcp") or
    OUT/ckpt.pt's dict, whichever has the later step (the DCP one on a tie)."""
    pt, dd = os.path.join(out, CKPT_NAME), os.path.join(out, DCP_NAME)
    meta = read_dcp_meta(dd) if os.path.isdir(dd) else None
    ckpt = load_checkpoint(pt) if os.path.isfile(pt) else None
    if meta is None and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint at {pt!r} or {dd!r}")
    if meta is not None and (ckpt is None or meta["step"] >= int(ckpt.get("step", 0))):
        return meta
    return ckpt


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------
class Progress:
    """Training progress with the total and an ETA: tqdm's bar on a terminal (loss, lr and
    tokens/s in it; validation losses as lines above it), a line every --log-interval steps
    otherwise (tritformer.progress)."""

    def __init__(self, total: int, start: int, interval: int, stream=None):
        self.total = total
        self.bar = ProgressBar(total, initial=start, desc="train", unit="step",
                               stream=sys.stdout if stream is None else stream, every=interval)

    def update(self, step: int, loss: float, lr: float, tok_s: float, val: Optional[float]):
        done = step + 1
        extra = f" | val {val:.4f}" if val is not None else ""
        msg = f"loss {loss:.4f} | lr {lr:.2e} | {tok_s / 1e3:.1f}k tok/s"
        when = lambda: ("done in " + format_seconds(self.bar.elapsed) if done >= self.total
                        else "ETA " + format_seconds(self.bar.eta()))
        self.bar.update(postfix=msg.replace(" | ", ", "), force=val is not None,
                        line=lambda: f"step {done}/{self.total} | {msg}{extra} | {when()}")
        if val is not None and self.bar.uses_tqdm:
            self.bar.write(f"step {done}/{self.total} | val {val:.4f}")

    def close(self):
        self.bar.close()


def plot_losses(rows: list[dict], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], label="train", lw=1)
    val = [r for r in rows if r["val_loss"] != ""]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def _device(args, local_rank: int) -> torch.device:
    if args.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


@torch.no_grad()
def estimate_val(model, shards: Shards, args, device, autocast_dtype, cp_group=None) -> float:
    model.eval()
    losses = []
    for i in range(args.eval_iters):
        x, y = _cp_shard(shards.batch("val", i, args.batch_size), cp_group)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            _, loss = model(x.to(device), y.to(device))
        losses.append(float(loss))
    model.train()
    return _world_mean(sum(losses) / len(losses), device)


def _world_mean(value: float, device) -> float:
    """The mean of `value` over all ranks (each rank's loss under CP is its share x CP, so this
    is the global batch's mean loss)."""
    if not torch.distributed.is_initialized():
        return value
    t = torch.tensor(value, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.cpu()) / torch.distributed.get_world_size()


def _cp_shard(xy, cp_group):
    """This rank's zigzag shard of each row of the (x, y) batch, or the batch itself."""
    if cp_group is None:
        return xy
    from .distributed import shard_sequence
    return tuple(shard_sequence(t, dim=1, group=cp_group, layout="zigzag") for t in xy)


def _dist_timeout() -> Optional[datetime.timedelta]:
    """TRITFORMER_DIST_TIMEOUT (seconds): a collective waiting longer fails instead of hanging
    (tests set it; unset: torch's default)."""
    value = os.environ.get("TRITFORMER_DIST_TIMEOUT")
    return datetime.timedelta(seconds=float(value)) if value else None


def main(args) -> int:
    check_args(args)
    args.context_parallel = getattr(args, "context_parallel", 1)
    args.cp_mode = getattr(args, "cp_mode", "ring")
    args.fsdp = getattr(args, "fsdp", False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    note = clamp_warmup(args)
    if note and rank == 0:
        print(note, flush=True)
    device = _device(args, local_rank)
    ckpt_path = os.path.join(args.out, CKPT_NAME)
    # everything that can fail on bad input fails here, before processes wait on each other
    ckpt = find_resume(args.out) if args.resume else None
    config = model_config(args, None if ckpt is None else ckpt["config"])
    check_parallel(args, config, world)
    cp = args.context_parallel
    dp = world // cp
    data = load_corpus(args.data, args.max_bytes)
    # the ranks of a CP group draw the same rows: data shard rank // cp of dp
    shards = Shards(data, config.block_size, args.val_fraction, rank // cp, dp, args.seed)

    cp_group = None
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = _dist_timeout()
        torch.distributed.init_process_group(backend=backend,
                                             **({"timeout": timeout} if timeout else {}))
        if cp > 1:  # every rank creates every group, in the same order
            for d in range(dp):
                g = torch.distributed.new_group(list(range(d * cp, (d + 1) * cp)),
                                                **({"timeout": timeout} if timeout else {}))
                if d == rank // cp:
                    cp_group = g
    try:
        code = _train(args, config, ckpt, shards, device, rank, world, ckpt_path, cp_group)
        if world > 1:
            # rank 0 writes the checkpoint, log and plot last; the others wait for it here. A rank
            # that tore its Gloo group down while rank 0 was still busy aborted now and then
            # ("terminate called without an active exception", SIGABRT: 1 of 6 runs on a loaded
            # 2-core machine)
            torch.distributed.barrier()
        return code
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _wrap(model: GPT, args, device, world: int):
    """FSDP2 over all ranks (--fsdp, more than one process), DDP (more than one process) or
    the model itself."""
    if world > 1 and args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world,))
        # a block's output is a view when the fused FFN adds the residual; the GPT never
        # modifies a block's output in place, which is what the warning is about
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # embeddings (tied to lm_head), ln_f
        return model
    if world > 1:
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def _train(args, config, ckpt, shards, device, rank, world, ckpt_path, cp_group=None) -> int:
    main_rank = rank == 0
    cp = args.context_parallel
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP broadcasts rank 0's)
    model = GPT(config).to(device)
    if cp_group is not None:
        model.set_context_parallel(cp_group, mode=args.cp_mode, layout="zigzag")
    opt = make_optimizer(model, args)
    start, rows = 0, []
    full = None
    if ckpt is not None and "dcp" not in ckpt:  # ckpt.pt: whole tensors into the plain model
        model.load_state_dict(ckpt["model"])
        if "optimizer" in ckpt:
            opt.load_state_dict(ckpt["optimizer"])
        elif main_rank:  # the end-of-run ckpt.pt of an --fsdp run whose ckpt_dcp is gone
            print(f"note: {ckpt_path} holds no optimiser state (written for generate by an "
                  f"--fsdp run); AdamW starts afresh", flush=True)
        if args.fsdp and world > 1:  # FQN-keyed copies, handed to the sharded model below
            from torch.distributed.checkpoint.state_dict import get_state_dict
            full = get_state_dict(model, opt)
    net = _wrap(model, args, device, world)
    if args.fsdp and world > 1:
        opt = make_optimizer(model, args)  # over the sharded parameters
        if full is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
            set_state_dict(model, opt, model_state_dict=full[0], optim_state_dict=full[1],
                           options=StateDictOptions(full_state_dict=True))
    if ckpt is not None:
        if "dcp" in ckpt:
            load_dcp_checkpoint(ckpt["dcp"], model, opt)
        start, rows = int(ckpt["step"]), list(ckpt.get("log", []))
    autocast_dtype = torch.bfloat16 if args.dtype in ("bf16", "bfloat16") else None
    dp = world // cp
    if main_rank:
        os.makedirs(args.out, exist_ok=True)
        how = ("FSDP" if args.fsdp else "DDP") if world > 1 else "one process"
        if cp > 1:
            how += f", context parallel {cp} ({args.cp_mode}) x data parallel {dp}"
        print(f"tritformer train: {model.num_params() / 1e6:.2f}M parameters, config {config}, "
              f"{world} process(es) on {device} ({how}), global batch {dp * args.batch_size} x "
              f"{config.block_size} bytes, {len(shards.train)} train / {len(shards.val)} val bytes"
              + (f", resuming at step {start}" if start else ""), flush=True)
        from .backend import model_backend_line  # which implementation runs (issue 20)
        print(model_backend_line(device, config.attn_backend, config.mlp_backend), flush=True)
        if start >= args.steps:
            print(f"nothing to do: the checkpoint is at step {start} >= --steps {args.steps}")
    bar = Progress(args.steps, start, args.log_interval) if main_rank and start < args.steps else None
    # the arguments as plain types now: one that a checkpoint cannot hold fails before training
    args_plain = plain(vars(args), "args")

    def checkpoint(step_done: int, last: bool = False):
        if args.fsdp:  # every rank writes its shards
            meta = {"step": step_done, "config": config.to_dict(), "args": args_plain,
                    "log": rows, "world_size": world}
            save_dcp_checkpoint(model, opt, meta if main_rank else None, args.out)
            if last:  # the whole model in ckpt.pt for `generate` (no optimiser: --resume takes
                # ckpt_dcp, which is as far on)
                weights = model.state_dict()
                if world > 1:
                    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                         get_model_state_dict)
                    weights = get_model_state_dict(model, options=StateDictOptions(
                        full_state_dict=True, cpu_offload=True))
                if main_rank:
                    _save({"model": weights, "step": step_done, "config": config.to_dict(),
                           "args": args_plain, "log": rows}, ckpt_path)
        elif main_rank:
            _save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step_done,
                   "config": config.to_dict(), "args": args_plain, "log": rows}, ckpt_path)

    net.train()
    tokens_per_step = dp * args.batch_size * config.block_size
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        x, y = _cp_shard(shards.batch("train", step, args.batch_size), cp_group)
        lr = lr_at(step, args)
        loss = train_step(net, opt, x.to(device), y.to(device), lr, args.grad_clip, autocast_dtype)
        if world > 1:
            loss = _world_mean(loss, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tok_s = tokens_per_step / max(time.perf_counter() - t0, 1e-9)
        last = step + 1 == args.steps
        val = None
        if last or (args.eval_interval and (step + 1) % args.eval_interval == 0):
            val = estimate_val(net, shards, args, device, autocast_dtype, cp_group)
        if main_rank:
            rows.append({"step": step + 1, "lr": lr, "train_loss": loss,
                         "val_loss": "" if val is None else val, "tokens_per_s": tok_s})
            bar.update(step, loss, lr, tok_s, val)
            if val is not None or last:
                _write_log(rows, args.out)
        if last or (step + 1) % args.ckpt_interval == 0:
            checkpoint(step + 1, last)
    if bar is not None:
        bar.close()
    if main_rank and rows:
        where = os.path.join(args.out, DCP_NAME) if args.fsdp else ckpt_path
        print(f"checkpoint: {where}; log: {os.path.join(args.out, 'log.csv')}"
              + ("; curve: " + os.path.join(args.out, "loss.png")
                 if os.path.exists(os.path.join(args.out, "loss.png")) else ""))
    return 0


def _write_log(rows: list[dict], out: str) -> None:
    with open(os.path.join(out, "log.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "lr", "train_loss", "val_loss", "tokens_per_s"])
        w.writeheader()
        w.writerows(rows)
    plot_losses(rows, os.path.join(out, "loss.png"))

