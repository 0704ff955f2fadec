"""MACs against hand counts, torchvision conversions, signed-input detection, the model registry."""

import urllib.error

import pytest
import torch
import torch.nn.functional as F

import instaquant as iq
from instaquant.config import UserError
from instaquant.cost import probe


def _hand_count_resnet20_macs() -> int:
    """Conv MACs = H_out·W_out·C_out·C_in·k², counted by hand for 32x32 inputs."""
    conv1 = 32 * 32 * 16 * 3 * 9
    stage1 = 6 * (32 * 32 * 16 * 16 * 9)
    stage2 = 16 * 16 * 32 * 16 * 9 + 5 * (16 * 16 * 32 * 32 * 9)
    stage3 = 8 * 8 * 64 * 32 * 9 + 5 * (8 * 8 * 64 * 64 * 9)
    fc = 64 * 10
    return conv1 + stage1 + stage2 + stage3 + fc


def test_resnet20_macs_equal_hand_count():
    layers = probe(iq.models.resnet20(), torch.randn(1, 3, 32, 32)).layers
    assert sum(i.macs for i in layers) == _hand_count_resnet20_macs() == 40_551_040
    assert len(layers) == 20


@pytest.mark.parametrize("name, giga", [("resnet18", 1.82), ("resnet50", 4.1)])
def test_torchvision_macs(name, giga):
    model = iq.models.get(name, num_classes=1000)
    total = sum(i.macs for i in probe(model, torch.randn(1, 3, 224, 224)).layers)
    assert abs(total / 1e9 - giga) / giga < 0.02, total


def test_profile_table_states_convention_and_controller_cost():
    fp = iq.models.resnet20()
    model = iq.dynamic(fp, iq.DynamicSpec(), torch.randn(1, 3, 32, 32))
    prof = iq.cost.profile(model, torch.randn(1, 3, 32, 32))
    table = prof.to_table()
    assert "full-precision layers are not counted" in table
    assert prof.controller_params == sum(p.numel() for p in model.controller.parameters())
    assert prof.controller_macs > 0
    kinds = {i.name: i.role for i in prof.layers}
    assert kinds["conv1"] == "fp" and kinds["layer1.0.conv1"] == "static"
    assert kinds["layer3.2.conv2"] == "dynamic"
    plain = iq.cost.profile(fp, torch.randn(1, 3, 32, 32))
    assert all(i.role == "fp" for i in plain.layers)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_torchvision_dynamic_and_static_forward_backward(name):
    fp = iq.models.get(name, num_classes=10)
    example = torch.randn(1, 3, 64, 64)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    dq = iq.dynamic(fp, iq.DynamicSpec(method="lsq", bits=(2, 3, 4)), example)
    # The tap chosen from the model (no spec.tap): the end of the first stride-4 stage.
    assert dq.spec.tap == {"mobilenet_v2": "features.3"}.get(name, "layer1")
    loss = F.cross_entropy(dq(x), y) + dq.budget_loss()
    loss.backward()
    assert torch.isfinite(loss)
    assert dq.last.bits_w.shape == (2, len(dq.dynamic_layers))
    assert dq.controller.fc1.weight.grad is not None
    qs = iq.static(fp, method="pact", bits=4, example_input=example)
    F.cross_entropy(qs(x), y).backward()
    assert all(p.grad is not None for p in qs.parameters() if p.requires_grad)


def test_mobilenet_v2_negative_inputs_get_signed_quantizers():
    fp = iq.models.get("mobilenet_v2", num_classes=10)
    dq = iq.dynamic(fp, iq.DynamicSpec(method="pact"), torch.randn(1, 3, 64, 64))
    signed = {i.name: i.input_negative for i in dq.quantized_layers}
    expand = [n for n in signed if n.endswith("conv.0.0") and not n.startswith("features.1.")]
    depthwise = [n for n in signed if n.endswith("conv.1.0")]
    project = [n for n in signed if n.endswith("conv.2")]
    depthwise.append("features.1.conv.0.0")  # block 1 has no expansion
    project.append("features.1.conv.1")
    assert len(expand) == 16 and len(depthwise) == 17 and len(project) == 17
    # The expand convs and the final 1x1 conv read a linear bottleneck: negative values.
    assert all(signed[n] for n in [*expand, "features.18.0"])
    # Depthwise and projection convs read ReLU6 outputs.
    assert not any(signed[n] for n in depthwise + project)
    for n in expand:
        assert dq.model.get_submodule(n).aq.signed
    assert not dq.model.get_submodule(depthwise[0]).aq.signed
    # Override per layer.
    spec = iq.DynamicSpec(method="pact", signed={expand[-1]: False})
    dq2 = iq.dynamic(fp, spec, torch.randn(1, 3, 64, 64))
    assert not dq2.model.get_submodule(expand[-1]).aq.signed


def test_signed_quantizer_keeps_negative_half():
    q_unsigned = iq.quant.make_activation_quantizer("pact", (4,), signed=False)
    q_signed = iq.quant.make_activation_quantizer("pact", (4,), signed=True)
    x = torch.linspace(-2, 2, 101)
    assert (q_unsigned(x, 0) >= 0).all()
    assert (q_signed(x, 0)[:50] < 0).all()


def test_registry_and_pretrained_offline_error(monkeypatch):
    assert {"resnet20", "resnet18", "mobilenet_v2", "digits_net"} <= set(iq.models.names())
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        iq.models.get("vgg")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    # A user error (one line from the CLI, exit 2), not a traceback.
    with pytest.raises(UserError, match="could not fetch torchvision's pretrained resnet18"):
        iq.models.get("resnet18", pretrained=True)


def test_digits_net_forward():
    net = iq.models.get("digits_net", num_classes=10, in_channels=1)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    dq = iq.dynamic(net, iq.DynamicSpec(bits=(2, 3, 4)), torch.randn(1, 1, 8, 8))
    assert dq(torch.randn(3, 1, 8, 8)).shape == (3, 10)
