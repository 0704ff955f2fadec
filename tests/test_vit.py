"""Transformers: token taps, dynamic Linear layers on tokens, attention products, the CIFAR ViT."""

import copy
import importlib.util

import pytest
import torch
from torch import nn

import instaquant as iq
from helpers import assert_models_match, seeded_train_step, varied_images
from instaquant.controller import BitController
from instaquant.cost import profile
from instaquant.models.vit import VisionTransformer
from instaquant.nn.attention import SplitAttention

HAS_TIMM = importlib.util.find_spec("timm") is not None
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed")


def _small_vit(**spec_kw):
    """A float64 dynamic ViT on 16x16 images (16 patches + class token, 3 blocks), its
    controller scaled up so that images choose differently."""
    fp = VisionTransformer(image_size=16, patch=4, dim=32, depth=3, heads=2)
    spec = iq.DynamicSpec(method=spec_kw.pop("method", "pact"), bits=(3, 4, 5), **spec_kw)
    model = iq.dynamic(fp, spec, torch.randn(2, 3, 16, 16)).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lin in (model.controller.fc1, model.controller.fc2):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 3.0)
    return model


def test_controller_reads_the_class_token_and_the_mean_patch_token():
    ctrl = BitController(4, num_layers=2, num_candidates=3, tokens=True)
    tokens = torch.randn(5, 7, 4)
    expected = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1)
    torch.testing.assert_close(ctrl.features(tokens), expected, atol=0, rtol=0)
    assert ctrl.fc1.in_features == 8
    assert ctrl.eval()(tokens).shape == (5, 2, 3)
    with pytest.raises(ValueError, match="controller_grid and controller_stats read feature maps"):
        BitController(4, 2, 3, grid=2, tokens=True)


def test_vit_converts_with_a_token_tap_and_every_projection_dynamic():
    model = _small_vit()
    assert model.spec.tap == "blocks.0" and "tokens 17x32" in model.tap_reason
    dynamic = [i.name for i in model.dynamic_layers]
    for block in (1, 2):
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            assert f"blocks.{block}.{layer}" in dynamic
    qkv = next(i for i in model.layers if i.name == "blocks.1.attn.qkv")
    assert qkv.macs == 17 * 32 * 96  # MACs per token x tokens
    x = varied_images(6)
    model.eval()
    with torch.no_grad():
        model(x)
    rec = model.last
    assert len(set(map(tuple, rec.bits_w.tolist()))) > 1  # images chose differently
    # BitOPs by hand: the static layers at 4 bits, each dynamic layer at its choice.
    static = sum(i.macs * 16 for i in model.layers if i.role == "static")
    for b in range(6):
        by_hand = static + sum(
            i.macs * int(bits) ** 2
            for i, bits in zip(model.dynamic_layers, rec.bits_w[b], strict=True)
        )
        assert rec.bitops[b].item() == by_hand


@pytest.mark.parametrize("method", ["pact", "lsq"])
def test_vit_fast_training_path_equals_the_reference_mixture(method):
    fast = _small_vit(method=method)
    x, y = varied_images(8), torch.arange(8) % 10
    seeded_train_step(copy.deepcopy(fast), x, y)  # quantizers initialised on real data
    fast.train()
    last = assert_models_match(fast, copy.deepcopy(fast), x, y)
    assert len(set(map(tuple, last.bits_w.tolist()))) > 1


def test_vit_routed_and_graph_inference_equal_the_reference():
    model = _small_vit()
    seeded_train_step(model, varied_images(8), torch.arange(8) % 10)
    model.eval()
    ref = copy.deepcopy(model)
    for layer in ref.dynamic_modules():
        layer.execution = "reference"
    x = varied_images(9, seed=4)
    with torch.no_grad():
        routed, ref_out = model(x), ref(x)
        model.set_execution("graph")
        graph = model(x)
        one = model(x[3:4])
    torch.testing.assert_close(routed, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(graph, routed, atol=1e-12, rtol=0)
    torch.testing.assert_close(one, routed[3:4], atol=1e-12, rtol=0)


def test_attention_products_are_listed_as_full_precision_macs():
    fp = iq.models.vit_cifar()
    x = torch.randn(2, 3, 32, 32)
    dq = iq.dynamic(fp, iq.DynamicSpec(), x)
    per_block = 4 * 65 * 65 * 32 * 2  # heads x queries x keys x head width, q·kᵀ and attn·v
    assert [(p.name, p.macs) for p in dq.products] == [
        (f"blocks.{i}.attn", per_block) for i in range(6)
    ]
    table = profile(dq, x).to_table()
    row = next(line for line in table.splitlines() if line.startswith("blocks.0.attn (products)"))
    assert row.split()[2:4] == ["fp", f"{per_block:,}"]
    layer_macs = sum(i.macs for i in dq.layers)
    assert f"total MACs {layer_macs + 6 * per_block:,}" in table
    # BitOPs hold the quantized layers only.
    assert dq.static_bitops(4) == sum(16 * i.macs for i in dq.layers if i.role != "fp")


@pytest.mark.parametrize("batch_first", [True, False])
def test_split_attention_computes_what_multihead_attention_computes(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).double().eval()
    split = SplitAttention(mha)
    q, k = torch.randn(3, 5, 16).double(), torch.randn(3, 7, 16).double()
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, -2:] = True
    mask = torch.randn(5, 7) > 1
    for kw in ({}, {"need_weights": False}, {"attn_mask": mask, "key_padding_mask": pad}):
        want, got = mha(q, k, k, **kw), split(q, k, k, **kw)
        torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=0)
        assert (got[1] is None) == (want[1] is None)
        if want[1] is not None:
            torch.testing.assert_close(got[1], want[1], atol=1e-12, rtol=0)


def test_torchvision_vit_b_16_converts_trains_and_evaluates():
    import torchvision

    fp = torchvision.models.vit_b_16(num_classes=10, image_size=32)
    model = _convert_train_eval(fp, 32, "encoder.layers.encoder_layer_1")
    # PyTorch's attention projections run as Linear modules (SplitAttention), so they quantize.
    names = {i.name: i.role for i in model.layers}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert names[f"encoder.layers.encoder_layer_5.self_attention.{proj}"] == "dynamic"
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


@needs_timm
@pytest.mark.parametrize(
    "name,tap",
    [
        ("resnet18", "layer1"),
        ("resnet26d", "layer1"),
        ("efficientnet_b0", "blocks.1"),
        ("mobilenetv3_small_100", "blocks.1"),
        ("regnety_002", "s2"),
        ("convnext_atto", "stages.0"),
        ("vit_tiny_patch16_224", "blocks.1"),
    ],
)
def test_timm_models_convert_without_naming_a_tap(name, tap):
    import timm

    kw = {"img_size": 64} if name.startswith("vit") else {}
    _convert_train_eval(timm.create_model(name, num_classes=10, **kw), 64, tap)


def _convert_train_eval(fp, size, tap):
    x = torch.randn(4, 3, size, size)
    model = iq.dynamic(fp, iq.DynamicSpec(method="lsq", bits=(2, 4, 8)), x[:2])
    assert model.spec.tap == tap and model.tap_reason.startswith("chosen:")
    assert f"bit controller reads {tap} (chosen:" in profile(model, x[:2]).to_table()
    model.train()
    out = model(x)
    (out.logsumexp(1).mean() + model.budget_loss()).backward()
    assert model.controller.fc2.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    assert model.last.bits_w.shape == (4, len(model.dynamic_layers))
    return model


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="the [export] extra is not installed",
)
@pytest.mark.parametrize("product_bits", [None, 4])
def test_vit_exports_to_onnx_with_the_same_choices(tmp_path, product_bits):
    import onnxruntime as ort

    model = _small_vit(product_bits=product_bits).float()
    seeded_train_step(model, varied_images(8).float(), torch.arange(8) % 10)
    model.eval()
    x = varied_images(6, seed=2).float()
    iq.export(model, x, tmp_path / "vit.onnx")
    session = ort.InferenceSession(str(tmp_path / "vit.onnx"))
    logits, bits_w, _, bitops = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x)
    assert (torch.from_numpy(bits_w) == model.last.bits_w).all()
    assert (torch.from_numpy(bitops) == model.last.bitops).all()
    torch.testing.assert_close(torch.from_numpy(logits), want, atol=1e-4, rtol=0)
