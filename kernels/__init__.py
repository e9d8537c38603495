"""tritformer's Triton kernels, installed as `tritformer.kernels` (setup.py's package_dir).

This directory must never be imported as the top-level module `kernels`: from a clone's root
(`python -m pytest`, `python -m tritformer ...`) the current directory is on sys.path, and
Hugging Face's `kernels` package (a dependency of transformers >= 5.25, which imports it) would
resolve here instead. Imported under that name, this module steps aside: it loads the next
`kernels` on sys.path in its place, or fails as a missing module would.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (tritformer's kernels/ directory is "
                                  "tritformer.kernels, not a top-level package)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
