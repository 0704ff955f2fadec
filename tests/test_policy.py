"""Fixed bits for a DQ model (layer policy, one candidate, one per layer): in eval and export."""

import importlib.util
import json
import os
import shlex
import warnings

import pytest
import torch

from helpers import dynamic_resnet20, parameters, unused_parameters, varied_images
from instaquant import config as C
from instaquant.builder import load_for_eval
from instaquant.cli import main
from instaquant.engine import fit
from instaquant.errors import UserError
from instaquant.evaluation import evaluate
from instaquant.export import ExportError, deployable, export
from instaquant.policy import layer_policy, parse_bits

TINY = ["data.name=digits", "data.limit=64", "data.batch_size=32", "model.name=digits_net"]


def _batches(n=3, size=8):
    return [(varied_images(size, seed=s), torch.zeros(size, dtype=torch.long)) for s in range(n)]


@pytest.fixture(scope="module")
def model():
    return dynamic_resnet20()


def test_one_candidate_or_one_per_layer(model):
    L = len(model.dynamic_layers)
    assert parse_bits("4", model) == ([4] * L, [4] * L)
    per_layer = [3, 5] * (L // 2) + [4] * (L % 2)
    assert parse_bits(",".join(map(str, per_layer)), model) == (per_layer, per_layer)
    assert parse_bits("policy", model) is None


@pytest.mark.parametrize("text", ["2", "3,4", "four", "", "3.0", "-3"])
def test_bits_that_are_no_assignment_are_refused_in_one_line(text, model):
    with pytest.raises(UserError) as err:
        parse_bits(text, model)
    message = str(err.value)
    assert "\n" not in message and f"--bits {text!r}" in message
    assert "allowed: policy, one of the candidates 3, 4, 5, or 12 comma-separated" in message


def test_the_layer_policy_is_each_layers_most_frequent_choice():
    model = dynamic_resnet20().eval()
    counts = torch.zeros(len(model.dynamic_layers), 3, dtype=torch.float64)
    with torch.no_grad():
        for x, _ in _batches():
            model(x)
            counts += model.last.selection.sum(0)
    assert (counts.amax(1) < counts.sum(1)).any()  # some layer splits: a majority to take
    expected = [model.spec.bits[i] for i in counts.argmax(1)]
    assert layer_policy(model, _batches()) == (expected, expected)
    assert not model.training  # left as it was
    biased = dynamic_resnet20(bias=torch.tensor([-9.0, -9.0, 9.0]))
    assert layer_policy(biased, _batches()) == ([5] * 12, [5] * 12)
    with pytest.raises(UserError, match="needs images"):
        layer_policy(model, [])


def test_separate_bits_give_each_their_own_majority():
    model = dynamic_resnet20(separate=True).eval()
    bits_w, bits_a = layer_policy(model, _batches())
    counts = torch.zeros(len(model.dynamic_layers), 2, 3, dtype=torch.float64)
    with torch.no_grad():
        for x, _ in _batches():
            model(x)
            counts += model.last.selection.sum(0)
    assert bits_w == [model.spec.bits[i] for i in counts[:, 0].argmax(-1)]
    assert bits_a == [model.spec.bits[i] for i in counts[:, 1].argmax(-1)]
    assert bits_w != bits_a  # the two majorities differ on these images: kept apart


@pytest.mark.parametrize(
    "method, kw",
    [("pact", {"candidate_bn": True}), ("dorefa", {"separate": True}), ("lsq", {"weight_bits": 4})],
)
def test_an_export_at_fixed_bits_runs_the_policy_without_the_controller(tmp_path, method, kw):
    model = dynamic_resnet20(method, **kw)
    model.train()
    model(varied_images(12))
    model = model.eval().float()
    bits = layer_policy(model, [(b.float(), y) for b, y in _batches()])
    x = varied_images(10, seed=7).float()
    previous = os.umask(0o022)
    try:
        with torch.no_grad(), model.forced_bits(*bits):
            expected = model(x)
            path = export(model, x, tmp_path / "policy.pt2", "pt2")
    finally:
        os.umask(previous)
    # Written atomically with the usual permissions (umask 022 here), not mkstemp's 0600.
    assert path.stat().st_mode & 0o777 == 0o644
    program = torch.export.load(path)
    logits, bits_w, bits_a, bitops = program.module()(x)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    # A static network at those bits: one quantized weight per dynamic layer, each the chosen
    # candidate's, and no controller computing anything.
    with model.forced_bits(*bits):
        frozen = deployable(model, x).model
    pairs = zip(frozen.dynamic_modules(), model.dynamic_modules(), bits[0], strict=True)
    for layer, source, b in pairs:
        k = model.spec.bits.index(b)
        assert layer.frozen_weights.shape[0] == 1
        torch.testing.assert_close(layer.frozen_weights[0], source.quantized_weight(k))
        assert not hasattr(layer, "weight")  # the float weight stays behind
    # Nor its weights: no parameter is the controller's, and every parameter is read.
    assert not [s.target for s in parameters(program) if "controller" in s.target]
    assert not unused_parameters(program)
    fixed = model.spec.weight_bits
    weights = [fixed if fixed else b for b in bits[0]]
    assert bits_w.tolist() == [[float(b) for b in weights]] * 10  # every image alike
    assert bits_a.tolist() == [[float(b) for b in bits[1]]] * 10
    assert len(set(bitops.tolist())) == 1
    with torch.no_grad():  # outside the block the model chooses per image again
        model(x)
    assert len(set(map(tuple, model.last.bits_a.tolist()))) > 1


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="the [export] extra is not installed",
)
def test_onnx_at_fixed_bits_holds_one_weight_per_layer_and_matches(tmp_path):
    import onnxruntime as ort

    model = dynamic_resnet20("pact", candidate_bn=True)
    model.train()
    model(varied_images(12))
    model = model.eval().float()
    x = varied_images(64, seed=3).float()
    bits = layer_policy(model, [(x, None)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on folded constants
        with torch.no_grad(), model.forced_bits(*bits):
            expected = model(x)
            fixed = export(model, x, tmp_path / "policy.onnx")
        chosen = export(model, x, tmp_path / "controller.onnx")
    session = ort.InferenceSession(str(fixed), providers=["CPUExecutionProvider"])
    logits = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    # As for the controller's graph (tests/test_export.py): most images within 1e-4 of the
    # logits' scale, the rest a quantization level apart at a float32 rounding boundary.
    close = (logits - expected).abs().amax(1) <= 1e-4 * expected.abs().max()
    agree = (logits.argmax(1) == expected.argmax(1)).double().mean()
    assert close.double().mean() >= 0.9 and agree >= 0.95  # measured: 0.97 and 1.0
    # Every candidate's weights (three) against one per layer: well under half the size.
    assert fixed.stat().st_size < 0.5 * chosen.stat().st_size


@pytest.fixture(scope="module")
def dq_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("policy") / "dq"
    fit(C.from_dict({"name": "dq", "out": str(out)}, [*TINY, "device=cpu"]), progress=False)
    return out


def test_cli_eval_at_the_layer_policy(dq_run, capsys):
    cfg, model, extra = load_for_eval(dq_run / "best.pt")
    bits = layer_policy(model, extra["test_loader"])
    with model.forced_bits(*bits):
        expected = evaluate(model, extra["test_loader"], cfg.ref_bits).metrics
    assert main(["eval", str(dq_run), "--bits", "policy"]) == 0
    out = capsys.readouterr().out
    assert "every image at fixed bits (policy), no controller:" in out
    first = model.dynamic_layers[0].name
    assert f"{first}" in out and f"W{bits[0][0]}A{bits[1][0]}" in out
    assert f"top1 {expected['top1']:.2f}%" in out
    assert f"{expected['bitops_rel']:.3f}x of static" in out
    assert main(["eval", str(dq_run), "--bits", "3", "--json"]) == 0
    captured = capsys.readouterr()
    assert '"top1"' in captured.out and "W3A3" in captured.err  # the JSON stays parseable


def test_cli_exports_a_run_at_its_layer_policy(dq_run, tmp_path, capsys):
    out = tmp_path / "policy.pt2"
    assert (
        main(["export", str(dq_run), "--out", str(out), "--format", "pt2", "--bits", "policy"]) == 0
    )
    printed = capsys.readouterr().out
    assert "every image at fixed bits (policy)" in printed and f"wrote {out} (pt2)" in printed
    _, model, extra = load_for_eval(dq_run / "best.pt")
    bits = layer_policy(model, extra["test_loader"])
    x = next(iter(extra["test_loader"]))[0][:1]
    logits, bits_w, _, _ = torch.export.load(out).module()(x)
    with torch.no_grad(), model.forced_bits(*bits):
        torch.testing.assert_close(logits, model.eval()(x), atol=1e-5, rtol=1e-5)
    assert bits_w.tolist() == [[float(b) for b in bits[0]]]


def test_cli_refuses_bits_for_a_static_run_and_bad_bits(dq_run, tmp_path, capsys):
    static = tmp_path / "s3"
    args = [*TINY, "device=cpu", "recipe=static", "quant.bits=[3]", "epochs=1"]
    fit(C.from_dict({"name": "s3", "out": str(static)}, args), progress=False)
    assert main(["eval", str(static), "--bits", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--bits fixes the bits of a DQ run" in err
    out = tmp_path / "m.pt2"
    assert main(["export", str(dq_run), "--out", str(out), "--format", "pt2", "--bits", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--bits '9'" in err and not out.exists()


def test_a_model_that_samples_its_choices_exports_at_fixed_bits(tmp_path):
    # Fixed bits make the graph deterministic, so sampling in evaluation is no reason to refuse.
    model = dynamic_resnet20("pact")
    model.train()
    model(varied_images(12))
    model = model.eval().float()
    model.spec.sample_in_eval = True
    x = varied_images(6, seed=5).float()
    with pytest.raises(ExportError, match="sample_in_eval"):
        export(model, x, tmp_path / "chosen.pt2", "pt2")
    bits = [4] * len(model.dynamic_layers)
    with torch.no_grad(), model.forced_bits(bits):
        expected = model(x)
        path = export(model, x, tmp_path / "fixed.pt2", "pt2")
    logits = torch.export.load(path).module()(x)[0]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_the_printed_layer_policy_trains_as_static_mixed_precision(dq_run, tmp_path, capsys):
    assert main(["eval", str(dq_run), "--bits", "policy"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("as static mixed precision"))
    keys = shlex.split(line.split(": ", 1)[1])
    _, model, extra = load_for_eval(dq_run / "best.pt")
    bits = layer_policy(model, extra["test_loader"])
    assert keys[0] == f"quant.bits=[{model.spec.fixed_bits}]"
    static = tmp_path / "mixed"
    args = [*TINY, "device=cpu", "recipe=static", "epochs=1", *keys]
    fit(C.from_dict({"name": "mixed", "out": str(static)}, args), progress=False)
    summary = json.loads((static / "summary.json").read_text())["runs"][0]
    names = [i.name for i in model.dynamic_layers]
    assert summary["layer_bits"] == dict(zip(names, bits[1], strict=True))
    _, mixed, _ = load_for_eval(static / "best.pt")
    for name, b in zip(names, bits[1], strict=True):
        assert mixed.model.get_submodule(name).bits == b
    with model.forced_bits(*bits):  # the same BitOPs as the DQ model at its policy
        expected = evaluate(model, extra["test_loader"], 3).metrics["bitops_mean"]
    assert summary["bitops_mean"] == pytest.approx(expected)
