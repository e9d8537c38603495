"""The op registry (tritformer.registry) behind validate, inspect and bench: every declaration
resolves, the tools iterate it, and it stays lazy."""
import json
import subprocess
import sys

import pytest

from tritformer import registry


def test_every_reference_resolves():
    import tritformer.testing as T
    for op in registry.OPS:
        if op.validate is not None:
            assert callable(registry.resolve(op.validate.run)), op.name
            assert op.validate.checks and 0 < op.validate.quick <= len(op.validate.cases)
            for name in op.validate.checks:
                assert callable(getattr(T, name)), (op.name, name)
        if op.inspect is not None:
            assert callable(registry.resolve(op.inspect.plans)), op.name
        if op.bench is not None:
            assert callable(registry.resolve(op.bench.run)), op.name
            assert set(op.bench.kernels) <= set(registry.names("inspect")), op.name


def test_the_tools_iterate_the_registry():
    from tritformer import bench, cli, inspect, validate
    assert bench.OPS == registry.names("bench") == (
        "attention", "masked", "varlen", "softmax", "ffn", "gated_ffn", "decode", "gpt", "ring")
    assert inspect.ALL_OPS == tuple(inspect.PLANS) == registry.names("inspect") == (
        "attention", "masked", "varlen", "softmax", "ffn", "decode", "kvcache")
    assert registry.names("validate") == ("attention", "masked", "varlen", "softmax", "ffn", "decode")
    assert [c[0] for c in validate.grid(["fp16"], True)] == (
        ["attention"] * 3 + ["masked"] * 2 + ["varlen"] + ["softmax"] * 2 + ["ffn"] * 2 + ["decode"])
    parser = cli._parser()
    args = parser.parse_args(["inspect"])
    assert tuple(args.op) == registry.names("inspect")
    assert parser.parse_args(["bench", "--op", "decode"]).op == ["decode"]
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--op", "rope"])  # no such op
    assert bench.INSPECT_OPS["gpt"] == ("attention", "decode", "ffn")


def test_registry_and_tritformer_imports_are_light():
    code = ("import sys, json, tritformer; light = sorted(m for m in sys.modules if m.startswith("
            "('tritformer.bench', 'tritformer.registry', 'tritformer.testing', 'tritformer.inspect',"
            " 'tritformer.validate')));\n"
            "import tritformer.registry; heavy = sorted(m for m in sys.modules if m.startswith("
            "('tritformer.bench', 'tritformer.kernels', 'tritformer.testing', 'tritformer.inspect')));\n"
            "print(json.dumps([light, heavy]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    light, heavy = json.loads(res.stdout.strip().splitlines()[-1])
    assert light == [] and heavy == [], (light, heavy)


def test_interpreter_tiles_do_not_mutate_the_shipped_table():
    from tritformer import bench
    from tritformer.kernels import attention as K
    from tritformer.kernels._launch import is_interpreted
    scope = K.configs_for.__globals__  # where configs_for reads the table
    shipped = scope["INTERPRETER_CONFIGS"]
    before = {k: (c.kwargs, c.num_warps, c.num_stages) for k, c in shipped.items()}
    with bench.interpreter_tiles():
        if is_interpreted(K._attn_fwd):
            assert K.configs_for("fwd", None, 64, 4)[0].kwargs == {"BLOCK_M": 256, "BLOCK_N": 256}
    with pytest.raises(RuntimeError), bench.interpreter_tiles({"fwd": (128, 128, 4, 1)}):
        raise RuntimeError  # restored on the way out of an error too
    assert scope["INTERPRETER_CONFIGS"] is shipped
    assert {k: (c.kwargs, c.num_warps, c.num_stages) for k, c in shipped.items()} == before
