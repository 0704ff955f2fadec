"""Graph-static execution (candidates selected by indexing) and export to torch.export / ONNX."""

import importlib.util
import warnings

import pytest
import torch

import instaquant as iq
from helpers import dynamic_resnet20, unused_parameters, varied_images
from instaquant.cli import main
from instaquant.export import ExportError, deployable, export
from instaquant.nn.indexed import UnsupportedForGraphError

HAS_ORT = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="the [export] extra is not installed")


def _ready(model, n=12):
    model.train()
    model(varied_images(n).to(next(model.parameters()).dtype))
    return model.eval()


@pytest.mark.parametrize(
    "method,kw",
    [
        ("pact", {}),
        ("lsq", {"candidate_bn": True}),
        ("dorefa", {"separate": True}),
        ("pact", {"share": True}),
    ],
)
def test_graph_execution_equals_routed_inference(method, kw):
    model = _ready(dynamic_resnet20(method, **kw))
    x = varied_images(10, seed=3)
    with torch.no_grad():
        routed, chosen = model(x), model.last.bits_w.clone()
        assert len(set(map(tuple, chosen.tolist()))) > 1  # samples chose differently
        model.set_execution("graph")
        graph = model(x)
        torch.testing.assert_close(model.last.bits_w, chosen, atol=0, rtol=0)
        torch.testing.assert_close(graph, routed, atol=1e-12, rtol=0)
        # Batch 1: one convolution on the indexed weight, the value of routing that sample.
        for i in (0, 7):
            one = model(x[i : i + 1])
            torch.testing.assert_close(one, routed[i : i + 1], atol=1e-12, rtol=0)


def test_graph_execution_follows_weight_updates():
    # Evaluation caches each candidate's quantized weight and their stack: an in-place update
    # (an optimizer step, load_state_dict) must reach the next graph forward.
    model = _ready(dynamic_resnet20())
    model.set_execution("graph")
    x = varied_images(8, seed=2)
    with torch.no_grad():
        before = model(x)
        conv = model.dynamic_modules()[3]
        conv.weight.mul_(-1.5)
        after = model(x)
        model.set_execution("fast")
        routed = model(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, routed, atol=1e-12, rtol=0)


def test_graph_execution_trains_as_fast():
    model = dynamic_resnet20()
    x = varied_images(6)
    torch.manual_seed(0)
    model.train()
    out_fast = model(x)
    out_fast.sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    model.set_execution("graph")
    torch.manual_seed(0)
    model(x).sum().backward()
    for g, p in zip(grads, [p for p in model.parameters() if p.grad is not None], strict=True):
        torch.testing.assert_close(p.grad, g, atol=0, rtol=0)


def test_lqnets_has_no_graph_form_and_says_so(tmp_path):
    model = _ready(dynamic_resnet20("lqnets"))
    model.set_execution("graph")
    with torch.no_grad(), pytest.raises(UnsupportedForGraphError, match="supported: dorefa, pact"):
        model(varied_images(4))
    with pytest.raises(ExportError, match="LQNets.* no graph-static form"):
        export(model, varied_images(2), tmp_path / "m.pt2", "pt2")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_bad_export_inputs_are_refused_in_one_line(tmp_path):
    model = _ready(dynamic_resnet20())
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"example input of shape \(3, 32, 32\) but the model"):
        export(model, torch.randn(1, 3, 32, 32).double(), out)
    with pytest.raises(ExportError, match="format 'tflite' is not allowed; allowed: onnx, pt2"):
        export(model, varied_images(1), out, "tflite")
    model.spec.sample_in_eval = True
    with pytest.raises(ExportError, match="sample_in_eval=True"):
        export(model, varied_images(1), out)
    with pytest.raises(ExportError, match="takes a quantized model"):
        export(iq.models.resnet20(), varied_images(1), out)
    assert list(tmp_path.iterdir()) == []


def _outputs_match(got, model, x, share=1.0, one_by_one=False):
    """Choices, bits and BitOPs exactly, predictions and logits (within 1e-4 of their scale)
    on at least ``share`` of the images. Another runtime's float32 accumulation may differ
    in the last bit, and where that crosses a fake quantizer's rounding boundary the value
    moves one quantization level; PyTorch's own graphs (share 1) have no such differences."""
    outs, recs = [], []
    with torch.no_grad():  # the batch, or (as a batch-1 graph ran) each image alone
        for part in x.split(1) if one_by_one else [x]:
            outs.append(model(part))
            recs.append(model.last)
    logits = torch.cat(outs)
    bits_w, bits_a, bitops = (
        torch.cat([getattr(r, k) for r in recs]) for k in ("bits_w", "bits_a", "bitops")
    )
    torch.testing.assert_close(got[1], bits_w.float(), atol=0, rtol=0)
    torch.testing.assert_close(got[2], bits_a.float(), atol=0, rtol=0)
    torch.testing.assert_close(got[3], bitops.float(), atol=0, rtol=1e-6)
    close = ((got[0] - logits).abs().amax(1) <= 1e-4 * logits.abs().max()).double().mean()
    assert close >= share, f"{float(close):.3f} of the images within 1e-4 of the logits' scale"
    agree = (got[0].argmax(1) == logits.argmax(1)).double().mean()
    assert agree >= min(share + 0.09, 1.0), f"predictions agree on {float(agree):.3f}"


def test_torch_export_of_the_dynamic_resnet20(tmp_path):
    model = _ready(dynamic_resnet20("pact", candidate_bn=True)).float()
    x = varied_images(16, seed=4).float()
    path = export(model, x, tmp_path / "m.pt2", "pt2")
    program = torch.export.load(path)
    got = program.module()(x)
    _outputs_match(got, model, x)
    assert len(set(map(tuple, got[1].tolist()))) > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]
    # The graph reads the quantized weights alone: the float ones are not in the archive.
    assert not unused_parameters(program)
    assert not [n for n in program.state_dict if n.endswith("layer1.0.conv1.weight")]


@pytest.mark.parametrize("fmt", ["pt2", pytest.param("onnx", marks=needs_ort)])
def test_batch_one_export_branches_per_candidate(tmp_path, fmt):
    # At batch 1 the graph holds one branch per candidate with constant weights (an If):
    # every candidate must be reachable and give that candidate's value.
    model = _ready(dynamic_resnet20("pact")).float()
    x = varied_images(24, seed=6).float()
    path = export(model, x[:1], tmp_path / f"m.{fmt}", fmt)
    if fmt == "pt2":
        run = torch.export.load(path).module()
    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(t):
            return [torch.from_numpy(a) for a in session.run(None, {"images": t.numpy()})]

    got = [torch.cat(t) for t in zip(*(run(x[i : i + 1]) for i in range(24)), strict=True)]
    _outputs_match(got, model, x, share=1.0 if fmt == "pt2" else 0.9, one_by_one=True)
    assert set(got[1].flatten().tolist()) == {3.0, 4.0, 5.0}  # each candidate taken


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torch_export_of_torchvision_models(name):
    fp = iq.models.get(name, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    model = iq.dynamic(fp, iq.DynamicSpec(method="lsq", bits=(2, 4, 8)), x)
    model.train()
    model(torch.randn(4, 3, 64, 64))
    model.eval()
    program = torch.export.export(deployable(model, x), (x,), strict=False)
    with torch.no_grad():
        _outputs_match(program.module()(x), model, x)


@needs_ort
def test_onnx_in_onnxruntime_matches_pytorch_on_256_images(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = _ready(dynamic_resnet20("lsq")).float()
    model.example_shape = (3, 32, 32)  # the export checks the size it was converted at
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BitOPs counted at 16 px: not what this test checks
        x = torch.randn(256, 3, 32, 32) * torch.linspace(0.2, 3, 256).view(-1, 1, 1, 1)
        path = export(model, x[:32], tmp_path / "m.onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [o.name for o in session.get_outputs()] == ["logits", "bits_w", "bits_a", "bitops"]
        got = [torch.cat(t) for t in zip(*(
            [torch.from_numpy(a) for a in session.run(None, {"images": c.numpy()})]
            for c in x.split(32)
        ), strict=True)]  # fmt: skip
        # Measured: 97% of the images within 1e-4, the rest one level apart; predictions agree.
        _outputs_match(got, model, x, share=0.9)
    assert len(set(map(tuple, got[1].tolist()))) > 1  # the graph chose per image


@needs_ort
def test_cli_exports_a_run(tmp_path, capsys):
    from instaquant import config as C
    from instaquant.engine import fit

    tiny = ["data.name=digits", "data.limit=64", "data.batch_size=32", "model.name=digits_net"]
    cfg = C.from_dict({"name": "dq", "out": str(tmp_path / "dq")}, [*tiny, "device=cpu"])
    fit(cfg, progress=False)
    # iq.load reads a run's checkpoint: the model instaquant eval rebuilds from the config.
    from instaquant.builder import load_for_eval

    _, rebuilt, _ = load_for_eval(tmp_path / "dq" / "best.pt")
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(iq.load(tmp_path / "dq")(x), rebuilt.eval()(x), atol=0, rtol=0)
    out = tmp_path / "dq.onnx"
    assert main(["export", str(tmp_path / "dq"), "--out", str(out), "--batch", "4"]) == 0
    assert f"wrote {out} (onnx): input images [4, 1, 8, 8]" in capsys.readouterr().out
    assert out.stat().st_size > 0
    with pytest.raises(SystemExit) as stop:
        main(["export", str(tmp_path / "dq"), "--out", str(out), "--batch", "0"])
    assert stop.value.code == 2 and "--batch: expected a number >= 1" in capsys.readouterr().err
