"""The README's Python quick-start runs as written."""

import re
from pathlib import Path

import pytest
import torch

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


def test_saving_and_export_block_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    saving = next(b for b in blocks if "iq.save(" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md quick start", "exec"), namespace)
    capsys.readouterr()
    before = namespace["model"]
    exec(compile(saving, "README.md saving", "exec"), namespace)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"](x), before(x), atol=0, rtol=0)
    assert {p.name for p in tmp_path.iterdir()} == {"dq.pt", "dq.onnx", "dq.pt2"}


def test_models_you_bring_block_runs():
    pytest.importorskip("timm", reason="the [timm] extra is not installed")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    block = next(b for b in blocks if "timm.create_model" in b)
    namespace: dict = {"iq": __import__("instaquant"), "torch": torch}
    exec(compile(block, "README.md models you bring", "exec"), namespace)
    model = namespace["model"]
    assert model.spec.tap == "blocks.1"
    assert model.tap_reason.startswith("chosen: the earliest stage end with 15%")
