"""docs/architecture.md maps every module, and names the layers the
import test (tests/pure/test_layers.py) enforces."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_module_is_on_the_map():
    text = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    named = set(re.findall(r"`([a-z_]+\.py)`", text)) | set(re.findall(r"\b([a-z_]+\.py)\b", text))
    missing = []
    for folder, _, names in os.walk(os.path.join(ROOT, "ipqd")):
        for name in names:
            if name.endswith(".py") and name != "__init__.py" and name not in named:
                missing.append(os.path.relpath(os.path.join(folder, name), ROOT))
    assert not missing, f"docs/architecture.md does not name {sorted(missing)}"
