"""iq.save / iq.load: one file per quantized model, exact round trips, clear refusals."""

import dataclasses

import pytest
import torch

import instaquant as iq
from helpers import dynamic_resnet20, varied_images
from instaquant.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _trained_once(model, x):
    model.train()
    model(x)  # lazy clips/steps and BatchNorm statistics move off their initial values
    return model.eval()


@pytest.mark.parametrize("method,kw", [("pact", {}), ("lsq", {"candidate_bn": True})])
def test_dynamic_round_trip_is_bit_identical(tmp_path, method, kw):
    model = _trained_once(dynamic_resnet20(method, **kw), varied_images(12))
    model.set_temperature(0.37)
    x = varied_images(10, seed=5)
    with torch.no_grad():
        y, bits = model(x), model.last.bits_w
    assert len(set(bits[:, 0].tolist())) > 1  # the controller splits the batch
    iq.save(model, tmp_path / "m.pt")
    loaded = iq.load(tmp_path / "m.pt")  # float64, as saved
    assert not loaded.training and loaded.tau == 0.37
    # The same spec, with the signed-activation plan pinned to the saved model's.
    plan = {i.name: i.input_negative for i in model.layers if i.role != "fp"}
    assert loaded.spec == dataclasses.replace(model.spec, signed=plan)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y, atol=0, rtol=0)
    torch.testing.assert_close(loaded.last.bits_w, bits, atol=0, rtol=0)


def test_static_round_trip_and_plain_types(tmp_path):
    fp = iq.models.resnet20(num_classes=7)
    model = _trained_once(
        iq.static(fp, "lsq", 3, torch.randn(2, 3, 16, 16)), torch.randn(4, 3, 16, 16)
    )
    iq.save(model, tmp_path / "s.pt")
    ckpt = torch.load(tmp_path / "s.pt", weights_only=True)  # plain types only
    assert ckpt["quant_model"]["arch"] == {"name": "resnet20", "num_classes": 7, "in_channels": 3}
    loaded = iq.load(tmp_path / "s.pt")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_a_backbone_from_outside_the_registry_is_passed_in(tmp_path):
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4),
    )  # fmt: skip
    spec = iq.DynamicSpec(
        method="dorefa",
        bits=(2, 4),
        tap="1",
        first_last="quantize",
        budget=iq.Budget(target_bits=3),
    )
    model = iq.dynamic(net, spec, torch.randn(1, 3, 12, 12)).eval()
    iq.save(model, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"outside instaquant.models; pass it"):
        iq.load(tmp_path / "c.pt")
    loaded = iq.load(tmp_path / "c.pt", model=net)
    x = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    # A float64 file loads into a float64 copy: the caller's network stays as it was.
    iq.save(model.double(), tmp_path / "c64.pt")
    assert iq.load(tmp_path / "c64.pt", model=net).controller.fc1.weight.dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_truncated_newer_and_foreign_files_are_refused_in_one_line(tmp_path):
    model = dynamic_resnet20().eval()
    path = tmp_path / "m.pt"
    iq.save(model, path)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or corrupted") as err:
        iq.load(tmp_path / "cut.pt")
    assert "\n" not in str(err.value)
    ckpt = load_checkpoint(path)
    save_checkpoint(tmp_path / "new.pt", **{**ckpt, "version": 99})
    with pytest.raises(CheckpointError, match="format version 99; this instaquant reads"):
        iq.load(tmp_path / "new.pt")
    ckpt["quant_model"]["spec"]["from_the_future"] = 1
    save_checkpoint(tmp_path / "spec.pt", **ckpt)
    with pytest.raises(CheckpointError, match="newer instaquant .unknown spec fields: from_the"):
        iq.load(tmp_path / "spec.pt")
    save_checkpoint(tmp_path / "fp.pt", model={})
    with pytest.raises(CheckpointError, match="holds no quantized model description"):
        iq.load(tmp_path / "fp.pt")
    with pytest.raises(TypeError, match="takes a quantized model"):
        iq.save(iq.models.resnet20(), tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_static_mixed_precision_round_trip(tmp_path):
    fp = iq.models.resnet20(num_classes=7)
    x = torch.randn(2, 3, 16, 16)
    model = _trained_once(iq.static(fp, "pact", 3, x, layer_bits={"layer3.*": 4}), x)
    iq.save(model, tmp_path / "m.pt")
    loaded = iq.load(tmp_path / "m.pt")
    assert loaded.model.layer3[0].conv1.bits == 4 and loaded.model.layer2[0].conv1.bits == 3
    assert torch.equal(loaded.layer_bits, model.layer_bits)
    batch = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model(batch), atol=0, rtol=0)
