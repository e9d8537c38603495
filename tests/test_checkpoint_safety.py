"""Training checkpoints are plain types, read with torch.load(weights_only=True) (issue 14, item
11): a checkpoint carrying a pickled callable is refused with a clear error by `load_checkpoint`,
`train --resume` and `generate --checkpoint` and never runs; the checkpoints `train` writes load
that way (also when the run's arguments hold paths or numpy scalars) and resume from them."""
import argparse
import os
import pathlib

import numpy as np
import pytest
import torch

from tritformer import cli, train
from tritformer.models import GPT, GPTConfig

pytestmark = pytest.mark.integration  # model-level; select or skip with -m (pyproject.toml)

TINY = dict(block_size=16, vocab_size=256, n_layer=1, n_head=2, n_embd=32)
TINY_ARGS = ["--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
             "--attn-backend", "naive", "--mlp-backend", "torch"]  # serialization, not kernels

# what the payload would do if it were ever unpickled: record the call (and nothing else)
_CALLS = []


def _payload_ran(*a):
    _CALLS.append(a)
    return {"payload": "ran"}


class _Payload:
    """Pickles as 'call _payload_ran(...) on load', as a hostile checkpoint's objects would
    (there: os.system, eval, ...)."""

    def __reduce__(self):
        return (_payload_ran, ("loaded",))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"def f(x):\n    return x + 1\n" * 200)
    return str(path)


class _Getpid:
    """A pickled call to a function of a module torch blocks outright (harmless: os.getpid)."""

    def __reduce__(self):
        return (os.getpid, ())


def _hostile_checkpoint(path, payload=None):
    """A checkpoint that is complete and valid except for one pickled callable."""
    model = GPT(GPTConfig(**TINY, attn_backend="naive", mlp_backend="torch"))
    torch.save({"model": model.state_dict(), "config": model.config.to_dict(), "step": 1,
                "optimizer": train.make_optimizer(model, _train_args()).state_dict(),
                "args": _Payload() if payload is None else payload, "log": []}, path)


def _train_args(*argv):
    return cli._parser().parse_args(["train", *argv])


def test_a_checkpoint_with_a_pickled_callable_is_refused_and_never_runs(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    ckpt = out / train.CKPT_NAME
    _hostile_checkpoint(ckpt)
    _CALLS.clear()
    # the shared reader
    with pytest.raises(ValueError, match="not a plain-type tritformer checkpoint") as e:
        train.load_checkpoint(str(ckpt))
    assert str(ckpt) in str(e.value) and "_payload_ran" in str(e.value)
    assert "retrain" in str(e.value)  # what to do about a checkpoint of an older format
    # train --resume, called directly and through the CLI (one-line error, exit status 2)
    with pytest.raises(ValueError, match="not a plain-type tritformer checkpoint"):
        train.main(_train_args("--data", corpus, "--out", str(out), "--resume", "--steps", "2",
                               *TINY_ARGS))
    assert cli.main(["train", "--data", corpus, "--out", str(out), "--resume", "--steps", "2",
                     *TINY_ARGS]) == 2
    err = capsys.readouterr().err
    assert "not a plain-type tritformer checkpoint" in err and str(ckpt) in err
    assert "Traceback" not in err
    # generate --checkpoint, the file and its directory
    for target in (ckpt, out):
        assert cli.main(["generate", "--checkpoint", str(target), "--prompt", "x",
                         "--max-new-tokens", "1"]) == 2
        err = capsys.readouterr().err
        assert "not a plain-type tritformer checkpoint" in err and str(ckpt) in err
    assert _CALLS == [], "the pickled callable ran while the checkpoint was read"
    # a callable from a module torch blocks (os, subprocess, ...) is refused the same way
    _hostile_checkpoint(ckpt, _Getpid())
    with pytest.raises(ValueError, match="not a plain-type tritformer checkpoint") as e:
        train.load_checkpoint(str(ckpt))
    assert "getpid" in str(e.value), str(e.value)


def test_a_file_that_is_no_plain_checkpoint_is_a_clear_error(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    truncated = tmp_path / "truncated.pt"
    model = GPT(GPTConfig(**TINY))
    torch.save({"model": model.state_dict(), "config": model.config.to_dict()}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    for path in (garbage, truncated):
        with pytest.raises(ValueError, match="not a .*tritformer .*checkpoint") as e:
            train.load_checkpoint(str(path))
        assert str(path) in str(e.value)
    # plain types, but not laid out as a checkpoint: an error here, not a KeyError/TypeError later
    bad = {"config is a list": {"model": model.state_dict(), "config": [1, 2]},
           "model holds a non-tensor": {"model": {"w": 1.0}, "config": model.config.to_dict()},
           "step is a string": {"model": model.state_dict(), "config": model.config.to_dict(),
                                "step": "3"},
           "not a dict": [model.state_dict()]}
    for why, obj in bad.items():
        path = tmp_path / "bad.pt"
        torch.save(obj, path)
        with pytest.raises(ValueError, match="not a tritformer training checkpoint"):
            train.load_checkpoint(str(path))
            pytest.fail(why)


def test_checkpoints_are_plain_even_with_path_and_numpy_arguments(corpus, tmp_path):
    # arguments built in Python rather than parsed from a command line: paths and numpy scalars
    # (the learning rate also reaches the optimiser state and the log) are written as str/float
    out = tmp_path / "run"
    args = _train_args("--data", corpus, "--out", str(out), "--steps", "1", "--batch-size", "1",
                       "--eval-iters", "1", "--warmup", "0", *TINY_ARGS)
    args.data, args.out = pathlib.Path(corpus), out
    args.lr, args.eval_iters = np.float64(2e-3), np.int64(1)
    assert train.main(args) == 0
    ckpt = torch.load(out / train.CKPT_NAME, weights_only=True)
    assert ckpt["args"]["data"] == corpus and ckpt["args"]["out"] == str(out)
    assert type(ckpt["args"]["lr"]) is float and ckpt["args"]["lr"] == 2e-3
    assert type(ckpt["args"]["eval_iters"]) is int and ckpt["args"]["eval_iters"] == 1
    assert all(type(g["lr"]) is float for g in ckpt["optimizer"]["param_groups"])
    assert type(ckpt["log"][0]["lr"]) is float
    # and it resumes (through the reader that refuses anything else)
    args = _train_args("--data", corpus, "--out", str(out), "--steps", "2", "--batch-size", "1",
                       "--eval-iters", "1", "--warmup", "0", "--lr", "2e-3", "--resume", *TINY_ARGS)
    assert train.main(args) == 0
    assert train.load_checkpoint(str(out / train.CKPT_NAME))["step"] == 2


def test_arguments_that_cannot_be_written_plainly_fail_before_training(corpus, tmp_path):
    args = _train_args("--data", corpus, "--out", str(tmp_path / "run"), "--steps", "1",
                       "--batch-size", "1", "--eval-iters", "1", *TINY_ARGS)
    args.callback = argparse.ArgumentParser  # an object a plain checkpoint cannot hold
    with pytest.raises(TypeError, match="args.callback"):
        train.main(args)
    assert not (tmp_path / "run" / train.CKPT_NAME).exists()
