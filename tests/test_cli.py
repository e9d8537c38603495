"""The command line: inspect (AOT compile for sm_80/sm_90), validate, and the CPU fallback."""
import os
import re
import subprocess

import pytest
import sys


def _run(args, interpret: bool, timeout=900):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("ops", [
    # one compile job per test, so that pytest-xdist spreads them (together about 7 minutes on
    # one worker, the 3.7.1 suite's long pole)
    ["attention"], ["masked"], ["varlen"], ["softmax", "ffn", "decode", "kvcache"],
], ids=lambda ops: "+".join(ops))
def test_inspect_head_dims_64_128_spill_free_with_tensor_cores(ops):
    # TRITON_INTERPRET is set in this process: inspect must re-run itself without it
    res = _run(["-m", "tritformer", "inspect", "--arch", "sm_80", "sm_90", "--head-dim", "64", "128",
                "--dtype", "fp16", "--op", *ops], interpret=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [line.split() for line in res.stdout.splitlines()
            if line.split() and line.split()[0].startswith(("attn_", "softmax", "ffn", "decode",
                                                            "kv"))]
    assert rows and {r[1] for r in rows} == {"sm_80", "sm_90"}, res.stdout[-3000:]
    for r in rows:
        spill, smem, mma = int(r[-4]), int(r[-3]), int(r[-2])
        assert spill == 0 and smem >= 0 and r[-1] == "ok", r
        if r[0].startswith("attn_") and r[0] != "attn_bwd_preprocess":  # preprocess: no matmul
            assert mma > 0 and smem > 0, r


def test_validate_quick():
    # one dtype (22 cases with fp16 and bf16 took 69-75 s, the 3.9 suite's longest test); the
    # dtype must be reported by its short name (bf16, never bfloat16)
    res = _run(["-m", "tritformer", "validate", "--quick", "--dtype", "bf16"], interpret=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "triton-interpreter" in res.stderr
    assert " 0 failed" in res.stdout
    # the duration announced before the run; progress with the total; dtypes named one way
    assert re.search(r"expected duration: about \d+(m\d\d)?s \(each op's cases", res.stderr), res.stderr[:500]
    assert "validate [1/11]" in res.stderr and "validate [11/11]" in res.stderr
    assert "attention bf16 " in res.stdout and "varlen bf16 " in res.stdout
    assert not re.search(r"float16|bfloat16|float32", res.stdout)
    assert " inf " not in res.stdout


def test_cpu_without_interpreter_uses_torch_fallback():
    code = (
        "import torch, tritformer\n"
        "from tritformer.testing import check_attention\n"
        "q, k, v = (torch.randn(1, 2, 20, 16, dtype=torch.float16) for _ in range(3))\n"
        "assert tritformer.backend_for(q) == 'torch', tritformer.backend_for(q)\n"
        "bad = [str(c) for c in check_attention(q, k, v, causal=True) if not c.ok]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    res = _run(["-c", code], interpret=False)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_cpu_without_interpreter_softmax_and_ffn_use_torch_fallback():
    # every op must run (fwd and bwd, within the criterion) on CPU without the interpreter
    code = (
        "import torch, tritformer\n"
        "from tritformer.testing import check_softmax, check_ffn, check_gated_ffn\n"
        "x = torch.randn(2, 5, 30, dtype=torch.float16)\n"
        "assert tritformer.backend_for(x) == 'torch'\n"
        "bad = [str(c) for c in check_softmax(x, scale=0.5, causal=True,\n"
        "                                    mask=torch.rand(1, 5, 30) > 0.3) if not c.ok]\n"
        "x = torch.randn(7, 12)\n"
        "w1, b1, w2, b2 = torch.randn(20, 12) / 4, torch.randn(20), torch.randn(9, 20) / 4, torch.randn(9)\n"
        "for rc in (False, True):\n"
        "    bad += [str(c) for c in check_ffn(x, w1, b1, w2, b2, activation='silu', recompute=rc) if not c.ok]\n"
        "    bad += [str(c) for c in check_gated_ffn(x, w1, w1.flip(0), w2, recompute=rc, b_up=b1) if not c.ok]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    res = _run(["-c", code], interpret=False)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
