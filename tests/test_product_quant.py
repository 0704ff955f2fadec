"""Quantized attention products (``product_bits``): operands quantized, counted in BitOPs."""

import copy
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import instaquant as iq
from helpers import assert_models_match, seeded_train_step, varied_images
from instaquant import config
from instaquant.cost import profile
from instaquant.models.vit import VisionTransformer
from instaquant.nn.product_quant import _attention


def _small_vit_fp():
    torch.manual_seed(0)
    return VisionTransformer(image_size=16, patch=4, dim=32, depth=3, heads=2).double()


def _dynamic_vit(product_bits=4):
    spec = iq.DynamicSpec(method="lsq", bits=(3, 4, 5), product_bits=product_bits)
    model = iq.dynamic(_small_vit_fp(), spec, varied_images(2))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a controller loud enough that images choose differently
        for lin in (model.controller.fc1, model.controller.fc2):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 3.0)
    return model


def test_quantized_attention_equals_its_operands_quantized_by_hand():
    model = iq.static(_small_vit_fp(), "lsq", 4, varied_images(2), product_bits=3)
    seeded_train_step(model, varied_images(8), torch.arange(8) % 10)  # steps set from data
    model.eval()
    attn = model.model.blocks[1].attn
    seen = {}
    attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        model(varied_images(5, seed=3))
        x = seen["x"]
        B, N, C = x.shape
        qkv = attn.qkv(x).reshape(B, N, 3, attn.heads, C // attn.heads).permute(2, 0, 3, 1, 4)
        q, k, w, v = attn.product_quantizers.calls[0]  # query, key, weights, value
        scale = 1.0 / math.sqrt(C // attn.heads)
        scores = q(qkv[0], 0) @ k(qkv[1], 0).transpose(-2, -1) * scale
        weights = w(scores.softmax(-1), 0)
        # 3-bit unsigned weights: at most 8 levels, all on the learned step's grid.
        assert len(weights.unique()) <= 8
        out = weights @ v(qkv[2], 0)
        expected = attn.proj(out.transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(seen["out"], expected, atol=0, rtol=0)
    assert [quantizer.signed for quantizer in attn.product_quantizers.calls[0]] == [
        True,
        True,
        False,
        True,
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"is_causal": True},
        {"scale": 0.3},
        {"attn_mask": "bool"},
        {"attn_mask": "float"},
    ],
)
def test_written_out_attention_equals_pytorchs(kwargs):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in "qkv")
    if kwargs.get("attn_mask") == "bool":
        kwargs = {"attn_mask": torch.rand(5, 5, generator=g) > 0.3}
        kwargs["attn_mask"][:, 0] = True  # every query attends somewhere
    elif kwargs.get("attn_mask") == "float":
        kwargs = {"attn_mask": torch.randn(2, 1, 5, 5, generator=g, dtype=torch.float64)}
    got = _attention([lambda x: x] * 4, (q, k, v), kwargs)
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_quantized_products_are_counted_in_bitops():
    fp = iq.models.vit_cifar()
    x = torch.randn(2, 3, 32, 32)
    plain = iq.dynamic(fp, iq.DynamicSpec(method="lsq"), x)
    dq = iq.dynamic(fp, iq.DynamicSpec(method="lsq", product_bits=8), x)
    product_macs = sum(p.macs for p in plain.products)
    assert product_macs == 6 * 4 * 65 * 65 * 32 * 2 and dq.products == []
    rows = [i for i in dq.layers if i.op == "product"]
    assert [(i.name, i.role, i.bits) for i in rows] == [
        (f"blocks.{b}.attn (products)", "static", (8,)) for b in range(6)
    ]
    # The reference and the budget target count the products at their 8 bits.
    assert dq.static_bitops(4) == plain.static_bitops(4) + 64 * product_macs
    assert dq.budget_target() == plain.budget_target() + 64 * product_macs
    dq.eval()
    with torch.no_grad():
        dq(x)
    static = sum(i.macs * i.bits[0] ** 2 for i in dq.layers if i.role == "static")
    for b in range(2):
        by_hand = static + sum(
            i.macs * int(bits) ** 2
            for i, bits in zip(dq.dynamic_layers, dq.last.bits_w[b], strict=True)
        )
        assert dq.last.bitops[b].item() == by_hand
    assert dq.last.bits_w.shape[1] == len(dq.dynamic_layers)  # products are not layers
    row = next(line for line in profile(dq, x).to_table().splitlines() if "(products)" in line)
    assert row.split()[2:5] == ["static", f"{product_macs // 6:,}", "0"] and row.endswith("8")


def test_fast_training_path_and_routed_inference_hold_with_quantized_products():
    fast = _dynamic_vit()
    x, y = varied_images(8), torch.arange(8) % 10
    seeded_train_step(copy.deepcopy(fast), x, y)
    fast.train()
    last = assert_models_match(fast, copy.deepcopy(fast), x, y)
    assert len(set(map(tuple, last.bits_w.tolist()))) > 1
    # The product quantizers learn too.
    step = fast.model.blocks[1].attn.product_quantizers.calls[0][0].step
    assert step.grad is not None and step.grad.abs().sum() > 0
    fast.eval()
    ref = copy.deepcopy(fast)
    for layer in ref.dynamic_modules():
        layer.execution = "reference"
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), atol=1e-12, rtol=0)


class _Scores(nn.Module):
    """Runs a product of its own, inside its owner's forward."""

    def forward(self, a, b):
        return a @ b.transpose(-2, -1)


class _Owner(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.scores = _Scores()

    def forward(self, x):
        h = self.proj(x)  # [B, N, 6]
        return torch.matmul(self.scores(h, h).softmax(-1), h)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 6)
        self.mix = _Owner()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.mix(self.stem(x)).mean(1))


def test_nested_owners_each_quantize_their_own_products():
    x = torch.randn(4, 5, 6)
    model = iq.static(_Net(), "pact", 4, x, first_last="quantize", product_bits=2)
    outer, inner = model.model.mix.product_quantizers, model.model.mix.scores.product_quantizers
    assert outer.kinds == ["matmul"] and inner.kinds == ["matmul"]
    # Signs from the probe: the softmax is non-negative, the projections are not.
    assert [q.signed for q in outer.calls[0]] == [False, True]
    seen = []
    for quantizers in (outer, inner):
        for q in quantizers.calls[0]:
            q.register_forward_hook(lambda m, args, out: seen.append(m))
    model.eval()
    model(x)  # with autograd on, the quantizers run as modules (their hooks see them)
    assert len(seen) == 4  # each operand once: the linear layers' arithmetic is left alone
    with torch.no_grad():
        h = model.model.mix.proj(model.model.stem(x))
        s = inner.calls[0][0](h, 0) @ inner.calls[0][1](h, 0).transpose(-2, -1)
        mixed = outer.calls[0][0](s.softmax(-1), 0) @ outer.calls[0][1](h, 0)
        torch.testing.assert_close(model(x), model.model.head(mixed.mean(1)), atol=0, rtol=0)


def test_a_module_running_other_products_than_at_conversion_is_refused():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = mha, nn.Linear(8, 2)
            self.need_weights = False

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=self.need_weights)[0].mean(1))

    x = torch.randn(2, 4, 8)
    model = iq.static(Block(), "lsq", 4, x, first_last="quantize", product_bits=4)
    assert model.model.attn.product_quantizers.kinds == ["sdpa"]
    model.model.need_weights = True  # the written-out path: two matmuls
    with pytest.raises(RuntimeError, match=r"'attn' ran a matmul as its product 1, but at conv"):
        model(x)
    model.model.need_weights = False
    assert model(x).shape == (2, 2)  # the mode was left cleanly
    assert (torch.ones(2, 3) @ torch.ones(3, 2) == 3).all()  # nothing left quantizing


def test_a_module_skipping_a_product_it_ran_at_conversion_is_refused():
    x = torch.randn(4, 5, 6)
    net = _Net()
    model = iq.static(net, "pact", 4, x, first_last="quantize", product_bits=4)
    model.model.mix.forward = lambda h: model.model.mix.proj(h)  # skips its one matmul
    with pytest.raises(RuntimeError, match=r"'mix' ran 0 of the 1 products it ran at conv"):
        model(x)
    assert (torch.ones(2, 3) @ torch.ones(3, 2) == 3).all()


def test_save_and_load_keep_quantized_products(tmp_path):
    for model in (
        _dynamic_vit(),
        iq.static(_small_vit_fp(), "lsq", 4, varied_images(2), product_bits=4),
    ):
        seeded_train_step(model, varied_images(8), torch.arange(8) % 10)
        model.eval()
        iq.save(model, tmp_path / "m.pt")
        loaded = iq.load(tmp_path / "m.pt", model=_small_vit_fp())
        x = varied_images(4, seed=7)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
        assert loaded.static_bitops(4) == model.static_bitops(4)


def test_bad_product_bits_are_refused():
    with pytest.raises(ValueError, match="runs no matrix product outside its Conv2d/Linear"):
        iq.dynamic(iq.models.resnet20(), iq.DynamicSpec(product_bits=8), torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="method 'lsq' needs product_bits >= 2, got 1"):
        iq.DynamicSpec(method="lsq", product_bits=1)
    with pytest.raises(ValueError, match="product_bits contains 9; allowed: integers 1..8"):
        iq.static(_small_vit_fp(), "pact", 4, varied_images(2), product_bits=9)
    cfg = {"name": "x", "recipe": "dynamic", "quant": {"product_bits": 0}}
    with pytest.raises(config.ConfigError, match="'quant.product_bits': 0 must be null or"):
        config.from_dict(cfg)


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_timm_vit_attention_quantizes_its_products():
    import timm

    net = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8)
    x = torch.randn(2, 3, 32, 32)
    model = iq.dynamic(net, iq.DynamicSpec(method="lsq", bits=(2, 4, 8), product_bits=8), x)
    rows = [i.name for i in model.layers if i.op == "product"]
    assert rows == [f"blocks.{b}.attn (products)" for b in range(12)]
    quantizers = model.model.blocks[3].attn.product_quantizers
    model.train()
    (model(x).logsumexp(1).mean() + model.budget_loss()).backward()
    assert all(q.step.grad is not None for q in quantizers.calls[0])
