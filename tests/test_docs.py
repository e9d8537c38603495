"""The docs' examples stay true (issue 20, item 6): every ```python block of docs/*.md runs here,
each in a fresh namespace, in the order of its page.

A block preceded by ``<!-- doctest: integration -->`` carries the pytest marker `integration`
(model-level: transformers); ``<!-- doctest: skip -->`` leaves a block out. ```bash blocks are
shown, not run (validate and bench take minutes in the interpreter; tests/test_cli.py runs them).
"""
import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"(?:<!-- doctest: (?P<tag>\w+) -->\n)?```python\n(?P<code>.*?)```", re.S)


def _blocks():
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        for n, m in enumerate(BLOCK.finditer(text), 1):
            if m["tag"] == "skip":
                continue
            line = text[:m.start("code")].count("\n") + 1
            marks = [pytest.mark.integration] if m["tag"] == "integration" else []
            if m["tag"] == "integration":
                marks.append(pytest.mark.skipif(not _has("transformers"), reason="needs transformers"))
            yield pytest.param(page.name, line, m["code"], id=f"{page.stem}-{n}", marks=marks)


def _has(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


def test_docs_have_examples():
    pages = {p.name for p in DOCS.glob("*.md")}
    assert {"swap-into-a-model.md", "validate.md", "benchmarking.md"} <= pages
    assert all("```python" in (DOCS / p).read_text(encoding="utf-8") for p in pages)


@pytest.mark.parametrize("page,line,code", list(_blocks()))
def test_doc_example(page, line, code, capsys):
    exec(compile(code, f"docs/{page}:{line}", "exec"), {"__name__": "__doc_example__"})
