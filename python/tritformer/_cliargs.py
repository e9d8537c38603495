"""The command line's argument definitions (`tritformer.cli`), torch-free: building the parser
for `--help`, `--version` or a usage error imports no torch, Triton or benchmark module; each
command imports what it needs once it runs.

`train.add_arguments` and `generate.add_arguments` are these functions, re-exported.
"""
from __future__ import annotations

import argparse

# bench --providers; tritformer.bench.core.PROVIDERS is this tuple
# sdpa = torch's default dispatch; sdpa_<backend> pins one SDPA backend (attention op only;
# flash / efficient / cudnn are CUDA kernels, math runs everywhere)
BENCH_PROVIDERS = ("naive", "sdpa", "sdpa_math", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn",
                   "tritformer", "flash_attn", "flex")

# the one spelling of dtypes on the command line (validate, inspect, bench)
DTYPE_NAMES = ("fp16", "bf16", "fp32")

# train: the model's defaults (a flag left unset takes the checkpoint's value with --resume)
MODEL_DEFAULTS = dict(block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=True,
                      attn_backend="tritformer", mlp_backend="tritformer")
CKPT_NAME = "ckpt.pt"
# train --fsdp: the torch.distributed.checkpoint directory (sharded; any world size resumes it)
DCP_NAME = "ckpt_dcp"
# train: --warmup is clamped to this fraction of --steps (a note says so)
WARMUP_MAX_FRACTION = 0.2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, also for options without a help text; list
    defaults as their values ("fp16 bf16", not "['fp16', 'bf16']"). Not shown: None (unset: the
    help says what happens) and False (an off switch), and where the help already names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False
                or default is argparse.SUPPRESS or "%(default)" in text or "default" in text):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return (text + " " if text else "") + f"(default: {shown.replace('%', '%%')})"


def train_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


# train --dtype: fp32/bf16 as everywhere else; the older float32/bfloat16 are still accepted
_TRAIN_DTYPES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}


def train_dtype(s: str) -> str:
    try:
        return _TRAIN_DTYPES[s.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"invalid choice: {s!r} (choose from fp32, bf16)") from None


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help="text file or folder (every file under it, sorted); default: the Python "
                        "standard library's *.py sources")
    p.add_argument("--max-bytes", type=int, default=8_000_000,
                   help="use at most this many bytes of the corpus")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="the last fraction of the bytes is the validation split")
    p.add_argument("--out", default="train-out", help="checkpoint, log.csv and loss.png go here")
    p.add_argument("--resume", action="store_true", help=f"continue from OUT/{CKPT_NAME}")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps in total")
    p.add_argument("--batch-size", type=int, default=16, help="rows per process per step")
    g = p.add_argument_group("model (default: from the checkpoint with --resume, else "
                             + ", ".join(f"{k}={v}" for k, v in MODEL_DEFAULTS.items()) + ")")
    g.add_argument("--block-size", type=int, default=None, help="context length (bytes)")
    g.add_argument("--n-layer", type=int, default=None, help="transformer blocks")
    g.add_argument("--n-head", type=int, default=None, help="attention heads")
    g.add_argument("--n-embd", type=int, default=None, help="model width")
    g.add_argument("--dropout", type=float, default=None)
    g.add_argument("--bias", type=train_bool, default=None, metavar="{true,false}",
                   help="biases in the Linear layers and LayerNorms")
    g.add_argument("--attn-backend", choices=("tritformer", "sdpa", "naive"), default=None)
    g.add_argument("--mlp-backend", choices=("tritformer", "torch"), default=None)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=1e-4, help="learning rate at the end of the cosine decay")
    p.add_argument("--warmup", type=int, default=100,
                   help=f"warm-up steps (linear); at most {WARMUP_MAX_FRACTION * 100:.0f}%% of --steps "
                        "(a larger value is clamped, with a note)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW's, on matrices only")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--eval-interval", type=int, default=250, help="steps between validation "
                                                                     "losses (0: only at the end)")
    p.add_argument("--eval-iters", type=int, default=20, help="batches per validation estimate")
    p.add_argument("--ckpt-interval", type=int, default=500, help="steps between checkpoints "
                                                                     "(and one at the end)")
    p.add_argument("--log-interval", type=int, default=10,
                   help="steps between progress lines when the output is not a terminal")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", type=train_dtype, choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast (parameters and optimiser stay fp32); float32 and "
                        "bfloat16 are accepted too")
    p.add_argument("--seed", type=int, default=1337)
    d = p.add_argument_group("parallelism (torchrun --nproc_per_node=N; without these flags: DDP "
                             "over the N processes)")
    d.add_argument("--context-parallel", type=int, default=1, metavar="CP",
                   help="shard every sequence across CP ranks (ring or Ulysses attention); data "
                        "parallelism over the remaining N / CP groups")
    d.add_argument("--cp-mode", choices=("ring", "ulysses"), default="ring",
                   help="context-parallel attention: ring (any head count) or ulysses (n_head "
                        "divisible by CP)")
    d.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimiser state over all N ranks (FSDP2 "
                        f"fully_shard) instead of DDP; checkpoints go to OUT/{DCP_NAME} "
                        "(torch.distributed.checkpoint, resumable on any N)")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="ckpt.pt or ckpt_dcp/ from `tritformer train` (or its --out folder: the "
                        "further-on of the two), or a GPT-2 directory")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens "
                                                          "only (unset: all)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--attn-backend", choices=("tritformer", "sdpa", "naive"), default="tritformer")
    p.add_argument("--no-cache", action="store_true", help="rerun the whole context every step")
