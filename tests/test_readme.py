"""The README's code runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_classify_on_cls_snippet_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    snippet = next(b for b in blocks if "from_pretrained(\"minilm-l6\"" in b)
    namespace: dict = {}
    exec(compile(snippet, str(README), "exec"), namespace)
    assert namespace["logits"].shape == (1, 4)
