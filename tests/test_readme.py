"""The README's Python quick-start runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_python_quick_start_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python block"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md quick start", "exec"), namespace)
    model, rec = namespace["model"], namespace["rec"]
    assert not model.training, "the quick start ends in evaluation mode"
    assert model.tau == 0.2  # annealed by set_progress
    assert rec.bits_w.shape == (8, len(model.dynamic_modules()))
    table = capsys.readouterr().out
    assert "layer2.0.conv1" in table and "dynamic" in table  # the cost table it prints
