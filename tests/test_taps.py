"""The default tap: cuts of the forward, stage ends, and the MACs share rule."""

import pytest
import torch
import torchvision
from torch import nn

import instaquant as iq
from instaquant.cost import profile
from instaquant.taps import TAP_MACS_SHARE, choose_tap, find_cuts


@pytest.mark.parametrize(
    "build,size,tap",
    [
        (lambda: iq.models.resnet20(), 32, "layer1"),  # stride 1 until layer2
        (lambda: torchvision.models.resnet18(num_classes=10), 64, "layer1"),
        (lambda: torchvision.models.mobilenet_v2(num_classes=10), 64, "features.3"),
        (lambda: iq.models.vit_cifar(), 32, "blocks.0"),
    ],
)
def test_default_tap_of_the_registry_models(build, size, tap):
    assert choose_tap(build(), torch.randn(2, 3, size, size)).name == tap


def test_a_residual_block_is_cut_only_at_its_end():
    cuts = {c.name: c for c in find_cuts(iq.models.resnet20(), torch.randn(2, 3, 32, 32))}
    # Inside a block the block's input still waits for the addition.
    assert "layer1.0.conv1" not in cuts and "layer1.0.bn2" not in cuts
    assert {"layer1.0", "layer1.1", "layer1", "layer2"} <= set(cuts)
    # layer1 and its last block end at one point: the cut takes the outer name.
    assert "layer1.2" not in cuts
    assert cuts["layer1"].stage_end and not cuts["layer1.1"].stage_end
    assert cuts["layer1"].macs_share == pytest.approx(0.36, abs=0.01)


def test_the_expand_conv_of_a_downsampling_block_is_not_a_stage_end():
    # In MobileNetV2 the stride-2 block features.4 has no residual: its expand conv's output
    # is a cut at 16x16, but the stage ended with features.3.
    cuts = {
        c.name: c for c in find_cuts(torchvision.models.mobilenet_v2(), torch.randn(2, 3, 64, 64))
    }
    assert "features.4.conv.0" in cuts and not cuts["features.4.conv.0"].stage_end
    assert cuts["features.3"].stage_end


def test_explicit_tap_overrides_and_the_choice_is_explained():
    x = torch.randn(2, 3, 32, 32)
    chosen = iq.dynamic(iq.models.resnet20(), iq.DynamicSpec(), x)
    assert chosen.spec.tap == "layer1"
    assert chosen.tap_reason == (
        f"chosen: the earliest stage end with {TAP_MACS_SHARE:.0%} of the MACs before it "
        "(36%; feature map 16x32x32)"
    )
    assert "tap='layer1': chosen" in repr(chosen)
    named = iq.dynamic(iq.models.resnet20(), iq.DynamicSpec(tap="layer2"), x)
    assert named.spec.tap == "layer2" and named.tap_reason == "named by spec.tap"
    assert "bit controller reads layer2 (named by spec.tap)" in profile(named, x).to_table()


def test_saved_model_keeps_the_reason(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    model = iq.dynamic(iq.models.resnet20(), iq.DynamicSpec(), x)
    iq.save(model, tmp_path / "m.pt")
    assert iq.load(tmp_path / "m.pt").tap_reason == model.tap_reason


def test_no_stage_end_with_enough_macs_names_the_candidates():
    # A tiny conv, then everything in one Linear: no stage end before it holds 15% of MACs.
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 8 * 8, 500))
    with pytest.raises(
        ValueError,
        match=r"cannot choose the tap module of Sequential.*considered: 1 \(1% of MACs\).*spec.tap",
    ):
        iq.dynamic(net, iq.DynamicSpec(), torch.randn(2, 3, 8, 8))


def test_a_tap_that_is_neither_feature_map_nor_tokens_is_refused():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"tap module '1' outputs per-sample shape \(8,\)"):
        iq.dynamic(net, iq.DynamicSpec(tap="1"), torch.randn(2, 3, 2, 2))


def test_a_module_that_runs_twice_is_never_the_default_tap():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
            self.head = nn.Sequential(
                nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(512, 3)
            )

        def forward(self, x):
            return self.head(self.block(self.block(self.stem(x))))

    x = torch.randn(2, 3, 8, 8)
    assert "block" not in {c.name for c in find_cuts(Twice(), x)}
