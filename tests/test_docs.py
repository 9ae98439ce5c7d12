"""The Python examples in the docs run as written (every ```python block in docs/*.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)

EXAMPLES = [(path, i, code) for path in sorted(DOCS.glob("*.md"))
            for i, code in enumerate(BLOCK.findall(path.read_text()))]


def test_the_docs_have_examples():
    assert any(path.name == "pooling_api.md" for path, _, _ in EXAMPLES)


@pytest.mark.parametrize("path,index,code", EXAMPLES,
                         ids=[f"{p.name}-{i}" for p, i, _ in EXAMPLES])
def test_doc_example_runs(path, index, code):
    exec(compile(code, f"{path}:block{index}", "exec"), {"__name__": f"doc_example_{index}"})
