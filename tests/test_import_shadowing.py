"""The repo's top-level kernels/ directory (installed as tritformer.kernels) must not shadow a
top-level `kernels` module when a command runs from the clone's root: transformers >= 5.25
depends on Hugging Face's `kernels` package and imports it, and `python -m ...` puts the
current directory first on sys.path (found by the test collection failing in test_hf.py)."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, *flags):
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_installed_kernels_package_wins_from_the_repo_root():
    outside = subprocess.run([sys.executable, "-c", "import importlib.util as u; "
                              "s = u.find_spec('kernels'); print(s.origin if s else '')"],
                             cwd=os.path.dirname(ROOT), capture_output=True, text=True)
    if not outside.stdout.strip():
        pytest.skip("no top-level `kernels` package installed in this environment")
    r = _run("import kernels; print(kernels.__file__)")
    assert r.returncode == 0, r.stderr
    assert os.path.realpath(r.stdout.strip()) == os.path.realpath(outside.stdout.strip())


def test_without_an_installed_kernels_package_the_import_fails_cleanly():
    # -S: no site-packages, so no other `kernels` anywhere on the path; ours must not stand in
    r = _run("import kernels", "-S")
    assert r.returncode != 0
    assert "ModuleNotFoundError" in r.stderr and "tritformer.kernels" in r.stderr


def test_tritformer_kernels_still_import():
    r = _run("import tritformer.kernels.attention, tritformer.kernels.ffn; print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="no transformers")
def test_transformers_hub_kernels_imports_from_the_repo_root():
    r = _run("import transformers.integrations.hub_kernels; print('ok')")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
