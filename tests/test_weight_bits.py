"""Fixed weight bits (``weight_bits``): candidates and budget name activation bits only.

Weights then quantize to the same tensor whatever a layer chooses, BitOPs grow linearly in
the chosen bits, and the static W·A model is the matching baseline. The fast path keeps its
exactness against the reference mixture, and the conversion survives iq.save / iq.load.
"""

import copy

import pytest
import torch

import instaquant as iq
from helpers import assert_models_match, dynamic_resnet20, varied_images
from instaquant import report
from instaquant.config import ConfigError, from_dict
from instaquant.cost import profile
from instaquant.headroom import measure_headroom
from instaquant.quant.functional import dorefa_weight

X16 = (1, 3, 16, 16)
EXACT = dict(atol=0, rtol=0)


def _w4(method="pact", bits=(2, 3, 4), budget=None, **kw):
    fp = iq.models.resnet20(num_classes=10)
    budget = budget or iq.Budget(target_bits=3)  # W4A3: 0.75x the 4-bit model
    spec = iq.DynamicSpec(method=method, bits=bits, weight_bits=4, budget=budget, **kw)
    return iq.dynamic(fp, spec, example_input=torch.randn(*X16))


def test_every_candidate_quantizes_the_weights_at_weight_bits():
    model = _w4()
    for layer in model.dynamic_modules():
        expected = dorefa_weight(layer.weight, 4)  # the closed form at 4 bits
        for k in range(3):
            torch.testing.assert_close(layer.quantized_weight(k), expected, atol=0, rtol=0)
        assert layer.wq.num_slots == 1  # one weight grid, not one per activation candidate
    fixed = [i for i in model.layers if i.role == "static"]
    assert fixed and all(i.weight_bits == 4 and i.bits == (3,) for i in fixed)
    layer1 = model.model.layer1[0].conv1  # before the tap: W4 and the middle candidate A3
    assert layer1.weight_bits == 4 and layer1.bits == 3


def test_bitops_are_linear_in_the_chosen_activation_bits():
    model = _w4()
    x = varied_images(6).float()
    with torch.no_grad():
        model.eval()(x)
    rec = model.last
    assert (rec.bits_w == 4).all()
    static = sum(i.macs * 4 * i.bits[0] for i in model.layers if i.role == "static")
    macs = torch.tensor([i.macs for i in model.dynamic_layers], dtype=torch.float32)
    torch.testing.assert_close(rec.bitops, (4 * rec.bits_a * macs).sum(1) + static)
    # Uniform activation bits: linear in b (4·b·MACs per layer), not b²; at the middle
    # candidate (the fixed layers' bits) exactly the static W4A3 model.
    dynamic_macs = sum(i.macs for i in model.dynamic_layers)
    cost = {}
    for b in (2, 3, 4):
        with model.forced_bits([b] * len(model.dynamic_layers)), torch.no_grad():
            model(x)
        cost[b] = float(model.last.bitops[0])
    assert cost[4] - cost[3] == cost[3] - cost[2] == 4 * dynamic_macs
    fp = iq.models.resnet20(num_classes=10)
    w4a4 = iq.static(fp, "pact", 4, torch.randn(*X16))
    w4a3 = iq.static(fp, "pact", 3, torch.randn(*X16), weight_bits=4)
    assert cost[3] == float(w4a3.bitops_per_sample)
    assert float(w4a3.bitops_per_sample) / float(w4a4.bitops_per_sample) == 0.75
    assert model.budget_target() == float(w4a3.bitops_per_sample)


def test_static_weight_bits_quantizes_weights_and_activations_apart():
    fp = iq.models.resnet20(num_classes=10)
    model = iq.static(fp, "pact", 3, torch.randn(*X16), weight_bits=4)
    conv = model.model.layer2[0].conv1
    torch.testing.assert_close(conv.quantized_weight(0), dorefa_weight(conv.weight, 4), **EXACT)
    assert conv.aq.bits == (3,)
    model.eval()(torch.randn(2, *X16[1:]))
    assert (model.last.bits_w == 4).all() and (model.last.bits_a == 3).all()


@pytest.mark.parametrize("method", ["pact", "lsq"])
def test_training_step_matches_the_reference_mixture(method):
    fast = dynamic_resnet20(method, weight_bits=4)
    rec = assert_models_match(fast, copy.deepcopy(fast), varied_images(8), torch.arange(8))
    assert len(torch.unique(rec.bits_a)) > 1 and (rec.bits_w == 4).all()


def test_mean_bits_budget_counts_the_chosen_activation_bits():
    model = _w4(budget=iq.Budget(kind="bits", target_bits=2.5, weight=1.0))
    with model.forced_bits([3] * len(model.dynamic_layers)):
        model(varied_images(4).float())
    # Mean activation bits 3 against a target of 2.5; the fixed 4-bit weights do not count.
    assert float(model.budget_loss()) == pytest.approx(0.5)


def test_round_trip_keeps_weight_bits(tmp_path):
    x = varied_images(6).float()
    for model in (_w4(), iq.static(iq.models.resnet20(), "pact", 3, x[:1], weight_bits=4)):
        model.train()(x)  # lazy clips set
        model.eval()
        iq.save(model, tmp_path / "m.pt")
        loaded = iq.load(tmp_path / "m.pt")
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), **EXACT)
        torch.testing.assert_close(loaded.last.bitops, model.last.bitops, **EXACT)
        assert (loaded.last.bits_w == 4).all()


def test_bad_weight_bits_are_refused_in_one_line():
    with pytest.raises(ValueError, match="weight_bits contains 9; allowed: integers 1..8"):
        iq.DynamicSpec(bits=(2, 3), weight_bits=9)
    with pytest.raises(ValueError, match="does not combine with separate=True"):
        iq.DynamicSpec(bits=(2, 3), weight_bits=4, separate=True)
    with pytest.raises(ValueError, match="needs bits >= 2 for weights"):
        iq.static(iq.models.resnet20(), "lsq", 3, torch.randn(*X16), weight_bits=1)
    with pytest.raises(ConfigError, match="quant.weight_bits.*set one of them"):
        from_dict({"quant": {"weight_bits": 4, "separate": True}})
    with pytest.raises(ConfigError, match="'quant.weight_bits': 0 must be null or an integer"):
        from_dict({"quant": {"weight_bits": 0}})


def test_tables_and_labels_name_the_fixed_weights():
    model = _w4()
    table = iq.cost.profile(model, torch.randn(*X16)).to_table()
    assert "layer2.0.conv1" in table and "2,3,4 (weights 4)" in table
    assert "32 (fp)" in table  # the full-precision first and last layers keep theirs
    run = {"recipe": "static", "method": "pact", "bits": [3], "weight_bits": 4}
    assert report._label(run) == "pact static W4 A3"
    assert report._label({**run, "weight_bits": None}) == "pact static 3-bit"


def test_relative_bitops_are_to_the_static_model_with_weights_at_the_reference_bits():
    # With weights fixed at 3 bits the reference stays static 4-bit (W4A4), not W3A4: a W3A3
    # model is 0.5625x of it, as static 3-bit is.
    fp = iq.models.resnet20(num_classes=10)
    x = torch.randn(*X16)
    w4a4, w3a3 = iq.static(fp, "pact", 4, x), iq.static(fp, "pact", 3, x)
    fixed = iq.static(fp, "pact", 3, x, weight_bits=3)
    spec = iq.DynamicSpec(
        method="pact", bits=(2, 3, 4), weight_bits=3, budget=iq.Budget(target_bits=3)
    )
    dq = iq.dynamic(fp, spec, example_input=x)
    static4 = float(w4a4.bitops_per_sample)
    for model in (fixed, dq, w3a3):
        assert model.static_bitops(4) == static4
    assert float(fixed.bitops_per_sample) == float(w3a3.bitops_per_sample)
    assert dq.budget_target() == float(w3a3.bitops_per_sample)  # activations at 3 bits, W3
    assert profile(dq, x).reference_bitops(4) == static4  # `instaquant profile`'s reference


def test_the_layer_policy_records_the_fixed_weight_bits():
    model = _w4()
    x = varied_images(8).float()
    loader = [(x, torch.arange(8) % 10)]
    room = measure_headroom(model, loader, ref_bits=4)
    bits_w, bits_a = room.policy_bits
    L = len(model.dynamic_layers)
    assert bits_w == [4] * L  # the weights, not the chosen candidate
    assert len(bits_a) == L and set(bits_a) <= {2, 3, 4}
    with model.forced_bits(bits_a), torch.no_grad():  # the policy's candidates run it again
        model.eval()(x)
    assert float(model.last.bitops[0]) == room.policy_bitops


def test_reports_name_the_reference_as_w_b_a_b_when_the_weights_are_fixed():
    # Relative BitOPs count against static b-bit with its weights at b too: with the run's
    # weights fixed at another width, "static 2-bit" would read as W4A2.
    from types import SimpleNamespace

    from instaquant.analysis import Analysis
    from instaquant.cost import reference_label
    from instaquant.engine import _epoch_line

    assert reference_label(2, weight_bits=4) == "static W2A2"
    assert reference_label(3) == "static 3-bit"
    name = Analysis.reference_name.fget
    assert name(SimpleNamespace(ref_bits=2, weight_bits=4)) == "static W2A2"
    metrics = {"train_loss": 1.0, "test_top1": 50.0, "test_bits_mean": 2.0, "test_bitops_rel": 1.5}
    fixed = from_dict({}, ["recipe=dynamic", "quant.bits=[1,2,3]", "quant.weight_bits=4"])
    joint = from_dict({}, ["recipe=dynamic", "quant.bits=[2,3,4]"])
    assert f"BitOPs 1.500x of static W{fixed.ref_bits}A{fixed.ref_bits}" in _epoch_line(
        fixed, 0, metrics
    )
    assert f"BitOPs 1.500x of static {joint.ref_bits}-bit" in _epoch_line(joint, 0, metrics)
