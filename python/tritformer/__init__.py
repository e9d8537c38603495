"""tritformer: Triton kernels for transformer layers, as drop-in PyTorch autograd functions."""
import importlib as _importlib
import os as _os
import sys as _sys

__version__ = "0.1.0"
__all__ = ["attention", "varlen_attention", "decode_attention", "scaled_dot_product_attention",
           "softmax", "ffn", "gated_ffn", "backend_for", "nn", "reference", "numerics", "patch",
           "__version__"]

# name -> (module, attribute; None: the module itself)
_EXPORTS = {
    "nn": (".nn", None), "numerics": (".numerics", None), "reference": (".reference", None),
    "backend_for": (".backend", "backend_for"),
    "attention": (".ops.attention", "attention"),
    "varlen_attention": (".ops.attention", "varlen_attention"),
    "decode_attention": (".ops.decode", "decode_attention"),
    "kvcache_append": (".ops.kvcache", "kvcache_append"),
    "ffn": (".ops.ffn", "ffn"), "gated_ffn": (".ops.ffn", "gated_ffn"),
    "scaled_dot_product_attention": (".ops.sdpa", "scaled_dot_product_attention"),
    "softmax": (".ops.softmax", "softmax"),
    "patch": (".patching", "patch"),
}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = _importlib.import_module(module, __name__)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


def _command_line_startup() -> bool:
    """True while `python -m tritformer ...` (argv[0] is "-m" while runpy imports this package)
    or the `tritformer` script imports this package on its way to tritformer.cli."""
    argv0 = _sys.argv[0] if _sys.argv else ""
    return argv0 == "-m" or _os.path.basename(argv0).split(".")[0] in ("tritformer", "tritformer-script")


# `import tritformer` imports the ops (and so registers their torch.ops.tritformer.* custom ops)
# as it always did. The command line skips that: `--help`, `--version` and a usage error then
# import no torch (about 4 s); each command imports what it uses, and the names above load on
# first access either way.
if not _command_line_startup():
    from . import nn, numerics, reference
    from .backend import backend_for
    from .ops.attention import attention, varlen_attention
    from .ops.decode import decode_attention
    from .ops.ffn import ffn, gated_ffn
    from .ops.sdpa import scaled_dot_product_attention
    from .ops.softmax import softmax
    from .patching import patch
