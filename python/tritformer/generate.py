"""`python -m tritformer generate`: stream text from a trained checkpoint or a GPT-2 directory.

--checkpoint is a checkpoint written by `tritformer train` (the ckpt.pt file, a ckpt_dcp/
directory of an --fsdp run, or the --out folder, which gives whichever of the two is further on,
as --resume does; byte-level, the prompt is encoded as UTF-8 bytes; plain types only, read by
`train.load_checkpoint` with torch.load(weights_only=True), so it cannot run code), or a local
GPT-2 directory (config.json + model.safetensors / pytorch_model.bin, loaded by `GPT.from_hf`)
whose tokenizer files (tokenizer.json, or vocab.json + merges.txt) are read with transformers'
tokenizer, never from the network.
"""
from __future__ import annotations

import codecs
import os
import sys

import torch

from ._cliargs import add_generate_arguments as add_arguments  # noqa: F401 (re-exported)
from .models.gpt import GPT, GPTConfig


def load_model(path: str, attn_backend: str = "tritformer"):
    """(model, encode, decoder) for a training checkpoint or a GPT-2 directory."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        model = GPT.from_hf(path, attn_backend=attn_backend)
        tok = _hf_tokenizer(path)
        return model, (lambda s: tok.encode(s)), _TokenDecoder(tok)
    from .train import (CKPT_NAME, DCP_META, DCP_NAME, find_resume, load_checkpoint,
                        load_dcp_checkpoint, read_dcp_meta)
    if os.path.isfile(os.path.join(path, DCP_META)):  # a ckpt_dcp directory itself
        ckpt = read_dcp_meta(path)
    elif os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                     for f in (CKPT_NAME, DCP_NAME)):
        ckpt = find_resume(path)  # a run directory: the further-on of ckpt.pt and ckpt_dcp
    elif os.path.isfile(path):
        ckpt = load_checkpoint(path)
    else:
        raise FileNotFoundError(f"--checkpoint: {path!r} is neither a checkpoint file nor a "
                                f"directory with {CKPT_NAME}, {DCP_NAME}/ or a GPT-2 config.json")
    config = GPTConfig.from_dict(dict(ckpt["config"], attn_backend=attn_backend, dropout=0.0))
    model = GPT(config)  # built from the checkpoint's own config: its weights fit
    if "dcp" in ckpt:  # torch.distributed.checkpoint shards (an --fsdp run), read on one process
        load_dcp_checkpoint(ckpt["dcp"], model)
    else:
        model.load_state_dict(ckpt["model"])
    if config.vocab_size != 256:
        raise ValueError(f"--checkpoint: vocab_size {config.vocab_size}; training checkpoints "
                         "are byte-level (256)")
    return model, (lambda s: list(s.encode("utf-8"))), _ByteDecoder()


def _hf_tokenizer(path: str):
    files = os.listdir(path)
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= set(files):
        raise FileNotFoundError(f"--checkpoint: GPT-2 directory {path!r} has no tokenizer files "
                                "(tokenizer.json, or vocab.json and merges.txt)")
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError("reading a GPT-2 tokenizer needs transformers: pip install "
                          "transformers") from e
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


class _ByteDecoder:
    """Byte tokens -> text as they arrive (a multi-byte character is printed once complete)."""

    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token: int) -> str:
        return self._dec.decode(bytes([token]))

    def flush(self) -> str:
        """What is left at the end: an incomplete character as U+FFFD."""
        return self._dec.decode(b"", final=True)


class _TokenDecoder:
    """BPE tokens -> the new text since the last call (decodes the whole generation each time:
    a token can complete a character started by the previous one)."""

    def __init__(self, tok):
        self.tok, self.ids, self.text = tok, [], ""

    def __call__(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # incomplete character: wait for the next token
        new, self.text = text[len(self.text):], text
        return new

    def flush(self) -> str:
        """What is left at the end (an incomplete character, as the tokenizer decodes it)."""
        text = self.tok.decode(self.ids)
        new, self.text = text[len(self.text):], text
        return new


def main(args, stream=None) -> int:
    stream = sys.stdout if stream is None else stream  # looked up per call (captured stdout)
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if not args.prompt:
        raise ValueError("--prompt must not be empty")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    model, encode, decode = load_model(args.checkpoint, args.attn_backend)
    ids = encode(args.prompt)
    if len(ids) > model.config.block_size:
        raise ValueError(f"--prompt is {len(ids)} tokens, longer than the model's context "
                         f"(block_size {model.config.block_size})")
    model.to(device).eval()
    from .backend import model_backend_line  # which implementation runs; stderr: stdout is the text
    print(model_backend_line(device, model.config.attn_backend, model.config.mlp_backend),
          file=sys.stderr, flush=True)
    torch.manual_seed(args.seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    stream.write(args.prompt)
    for tok in model.generate_stream(idx, args.max_new_tokens, temperature=args.temperature,
                                     top_k=args.top_k, use_cache=not args.no_cache):
        stream.write(decode(int(tok[0, 0])))
        stream.flush()
    stream.write(decode.flush() + "\n")
    return 0
