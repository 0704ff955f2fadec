"""LQ-Nets: levels, nearest-level quantization (exact), QEM, degenerate inputs, modules, models."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import instaquant as iq
from instaquant.nn.layers import DynamicQConv2d, QConv2d, QLinear
from instaquant.quant import lqnets as lq
from instaquant.quant.methods import (
    METHODS,
    make_activation_quantizer,
    make_weight_quantizer,
    min_bits,
)
from test_convert import X32, _dq, _spread_controller, _varied_batch, _warm_up

EXACT = dict(atol=0, rtol=0)


def _randn(*shape, seed=0, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _heavy(*shape, seed=0):
    """Heavy-tailed data (a Gaussian scale mixture), closer to real weights than a Gaussian."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * torch.rand(
        *shape, generator=g, dtype=torch.float64
    ).mul(2)


def _closed_form_levels(basis, signed):
    """``Σ_i e_i v_i`` for each code ``l`` (``e_i``: bit ``i`` of ``l``), summed in order of i."""
    k = basis.shape[-1]
    rows = []
    for code in range(2**k):
        e = [float((code >> i) & 1) for i in range(k)]
        if signed:
            e = [2 * b - 1 for b in e]
        acc = e[0] * basis[..., 0]
        for i in range(1, k):
            acc = acc + e[i] * basis[..., i]
        rows.append(acc)
    return torch.stack(rows, dim=-1)


def _brute_force_nearest(x, levels):
    """Nearest level by exhaustive search (ties to the lower level, as the sort is ascending)."""
    lv = levels.sort(dim=-1).values
    idx = (x[:, :, None] - lv[:, None, :]).abs().argmin(dim=-1)
    return lv.gather(1, idx)


# --------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("bits", range(1, 7))
@pytest.mark.parametrize("signed", [False, True])
def test_levels_closed_form_and_count(bits, signed):
    basis = _randn(3, bits, seed=bits).abs() + 0.1
    levels = lq.lq_levels(basis, signed)
    torch.testing.assert_close(levels, _closed_form_levels(basis, signed), **EXACT)
    assert levels.shape == (3, 2**bits)
    for row in levels:
        assert row.unique().numel() == 2**bits, "a generic basis gives 2^k distinct levels"
    if not signed:
        assert (levels[:, 0] == 0).all(), "the all-zero code gives the level 0"
    else:
        torch.testing.assert_close(levels.sort(-1).values, -levels.sort(-1).values.flip(-1))


@pytest.mark.parametrize("bits", range(1, 7))
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [3000, 2 * lq.SMALL])  # the in-thread and searchsorted paths
def test_fixed_basis_maps_every_value_to_its_nearest_level(bits, signed, dtype, size):
    # A random (non-uniform, mixed-sign) basis per group, values beyond the outer levels too.
    basis = _randn(3, bits, seed=10 + bits, dtype=dtype)
    x = _randn(3, size, seed=20 + bits, scale=2 * float(basis.abs().sum()), dtype=dtype)
    got = lq.lq_quantize(x, basis, signed)
    expected = _brute_force_nearest(x, _closed_form_levels(basis, signed))
    torch.testing.assert_close(got, expected, **EXACT)
    assert got.dtype == dtype


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
def test_dense_input_hits_all_2k_levels(bits, signed):
    q = lq.LQNetsActivation((bits,), signed=signed)
    x = torch.linspace(-3 if signed else 0, 3, 20000, dtype=torch.float64)
    q.double().eval()
    q(x, 0)  # initialises the basis from data on a range of width 3
    out = q(torch.linspace(-10, 10, 50000, dtype=torch.float64), 0)
    assert out.unique().numel() == 2**bits
    torch.testing.assert_close(
        out.unique(), lq.lq_levels(q.basis[0, :, :bits], signed).sort(-1).values[0], **EXACT
    )


def test_straight_through_gradients():
    basis = torch.tensor([[0.25, 0.5]], dtype=torch.float64)  # levels 0, .25, .5, .75
    x = torch.linspace(-0.5, 1.5, 201, dtype=torch.float64)[None].requires_grad_()
    lq.lq_quantize(x, basis, signed=False, clip_grad=True).sum().backward()
    torch.testing.assert_close(x.grad, ((x >= 0) & (x <= 0.75)).double(), **EXACT)
    x.grad = None
    lq.lq_quantize(x, basis, signed=True).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x), **EXACT)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_qem_step_never_increases_the_error(bits, signed, momentum):
    x = _heavy(4, 3000, seed=bits)
    if not signed:
        x = x.relu()
    # A poor start: a random basis a tenth of the data's scale.
    basis = 0.1 * _randn(4, bits, seed=100 + bits).abs()
    first = err = lq.quantization_error(x, basis, signed)
    for _ in range(15):
        basis = lq.qem_step(x, basis, signed, momentum=momentum)
        new = lq.quantization_error(x, basis, signed)
        assert (new <= err).all(), f"QEM raised the error: {err.tolist()} -> {new.tolist()}"
        err = new
    assert (err < 0.8 * first).all(), "QEM should improve a poor basis"


@pytest.mark.parametrize("signed", [False, True])
def test_qem_second_step_is_the_least_squares_solution(signed):
    x = _heavy(2, 2000, seed=5)
    basis = torch.tensor([[0.3, 0.5, 1.1], [0.2, 0.9, 0.6]], dtype=torch.float64)
    new = lq.qem_step(x, basis, signed, momentum=0.0, ridge=0.0, tol=0.0)
    _, code, _ = lq.nearest_level(x, basis, signed)
    e = lq.codes(3, signed, torch.float64)
    for g in range(2):
        B = e[code[g]]  # [M, k]: the code of every value
        expected = torch.linalg.lstsq(B, x[g, :, None]).solution[:, 0]
        torch.testing.assert_close(new[g], expected, atol=1e-10, rtol=1e-10)
    # The moving average is the convex combination of old and solved bases.
    mixed = lq.qem_step(x, basis, signed, momentum=0.9, ridge=0.0, tol=0.0)
    torch.testing.assert_close(mixed, 0.9 * basis + 0.1 * new, atol=1e-12, rtol=1e-12)


def test_qem_singular_system_keeps_old_basis_in_unused_directions():
    # Every value lands on the top code (1, 1): only v0 + v1 is determined by the data.
    x = torch.full((1, 100), 5.0, dtype=torch.float64)
    basis = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    new = lq.qem_step(x, basis, signed=False)
    assert torch.isfinite(new).all()
    # The ridge (1e-6 relative) leaves a bias of that order in the determined direction.
    close = dict(atol=1e-5, rtol=0)
    torch.testing.assert_close(new[0, 0] - new[0, 1], torch.tensor(-1.0).double(), **close)
    torch.testing.assert_close(new.sum(), torch.tensor(5.0).double(), **close)
    assert lq.quantization_error(x, new, False) < 1e-8


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("value", [0.0, 0.7, -2.0])
def test_constant_and_zero_inputs_keep_basis_and_levels_finite(bits, signed, value):
    for q in (lq.LQNetsActivation((bits,), signed=signed), lq.LQNetsWeight((bits,))):
        q.train()
        x = torch.full((4, 3, 5, 5), value)
        for _ in range(4):
            out = q(x, 0)
        levels = lq.lq_levels(q.basis[0, :, :bits], q.signed)
        assert torch.isfinite(q.basis).all() and torch.isfinite(levels).all()
        assert torch.isfinite(out).all()
        representable = signed or isinstance(q, lq.LQNetsWeight) or value >= 0
        if representable:
            # QEM moves a level onto the constant (the ridge leaves a tiny bias).
            torch.testing.assert_close(out, x, atol=1e-4 * max(1.0, abs(value)), rtol=0)
        assert bool(q.initialized.all()) == (value != 0), "all-zero data must not fix the scale"


# --------------------------------------------------------------------------- modules


def test_every_slot_initialised_from_the_first_tensor_and_eval_freezes_the_basis():
    x = _heavy(4, 8, 6, 6, seed=3).relu()
    q = lq.LQNetsActivation((2, 3, 4))
    q.double().eval()
    q(x, 1)
    assert q.initialized.all() and q.basis.shape == (3, 1, 4)
    for s, b in enumerate((2, 3, 4)):
        torch.testing.assert_close(q.basis[s, :, :b], lq.init_basis(x.reshape(1, -1), b, False))
        assert (q.basis[s, :, b:] == 0).all()
    frozen = q.basis.clone()
    for k in range(3):
        q(x * 1.7, k)
    torch.testing.assert_close(q.basis, frozen, **EXACT)
    q.train()
    q(x * 1.7, 2)
    torch.testing.assert_close(q.basis[:2], frozen[:2], **EXACT)
    assert not torch.equal(q.basis[2], frozen[2]), "training runs QEM on the called candidate"


def test_per_channel_weight_bases_and_state_dict_round_trip():
    w = _heavy(8, 4, 3, 3, seed=4) * torch.linspace(0.1, 2.0, 8, dtype=torch.float64).view(
        8, 1, 1, 1
    )
    q = lq.LQNetsWeight((2, 3))
    q.double().train()
    q(w, 0)
    q(w, 1)
    assert q.basis.shape == (2, 8, 3)
    q.eval()
    for k, b in enumerate((2, 3)):
        out = q(w, k).reshape(8, -1)
        levels = lq.lq_levels(q.basis[k, :, :b], True)
        for c in range(8):
            assert set(out[c].tolist()) <= set(levels[c].tolist()), "channel c uses its own levels"
    fresh = lq.LQNetsWeight((2, 3)).double().eval()
    fresh.load_state_dict(q.state_dict())
    assert fresh.basis.shape == (2, 8, 3) and fresh.initialized.all()
    for k in range(2):
        torch.testing.assert_close(fresh(w, k), q(w, k), **EXACT)


def test_training_forward_with_grad_does_not_break_autograd():
    # The basis is updated in place after the output is computed; backward must still work,
    # twice through the same slot within one graph, as the reference mixture may do.
    q = lq.LQNetsActivation((2, 3), signed=True)
    q.train()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    (q(x, 0) + q(x, 0) * 2 + q(x, 1)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_registration_and_share():
    assert "lqnets" in METHODS
    assert min_bits("lqnets", "weight") == min_bits("lqnets", "activation", signed=True) == 1
    wq = make_weight_quantizer("lqnets", (1, 2))
    aq = make_activation_quantizer("lqnets", (1, 2), signed=True)
    assert isinstance(wq, lq.LQNetsWeight) and wq.per_channel and wq.signed
    assert isinstance(aq, lq.LQNetsActivation) and aq.signed and not aq.per_channel
    assert not make_activation_quantizer("lqnets", (3,), signed=False).signed
    out = aq(torch.linspace(-2, 2, 101), 1)
    assert (out < 0).any() and (out > 0).any(), "signed activations keep negative values"
    with pytest.raises(ValueError, match="one basis per bit-width"):
        make_weight_quantizer("lqnets", (3, 4), share=True)
    assert make_weight_quantizer("lqnets", (4,), share=True).num_slots == 1


# --------------------------------------------------------------------------- models


def _bases(model):
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith(("aq.basis", "wq.basis"))}


@pytest.mark.parametrize("kind", ["static", "dynamic", "dynamic-separate"])
def test_resnet20_trains_a_few_steps_with_lqnets(kind):
    fp = iq.models.resnet20(num_classes=10)
    if kind == "static":
        model = iq.static(fp, method="lqnets", bits=2, example_input=torch.randn(*X32))
    else:
        # The separate choice also runs the reference mixture (the joint one the fast path).
        separate = kind.endswith("separate")
        execution = "reference" if separate else "fast"
        spec = iq.DynamicSpec(
            method="lqnets", bits=(2, 3, 4), separate=separate, execution=execution
        )
        model = iq.dynamic(fp, spec, example_input=torch.randn(*X32))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = _varied_batch(8), torch.arange(8) % 10
    before = None
    for _ in range(3):
        loss = F.cross_entropy(model(x), y) + model.budget_loss()
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        if before is None:
            before = _bases(model)
    after = _bases(model)
    assert after and all(torch.isfinite(b).all() for b in after.values())
    moved = [n for n in after if not torch.equal(before[n], after[n])]
    assert len(moved) == len(after), "every candidate's bases follow QEM during training"


def _per_layer_static_copy(model, chosen_bits):
    """The backbone with each dynamic layer replaced by a static one at the sample's bits, with
    that candidate's LQ-Nets bases copied."""
    backbone = copy.deepcopy(model.model)
    tap = backbone.get_submodule(model.spec.tap)
    tap._forward_hooks.clear()
    for info, bits in zip(model.dynamic_layers, chosen_bits, strict=True):
        dyn = model.model.get_submodule(info.name)
        k, b = dyn.bits.index(int(bits)), int(bits)
        cls = QConv2d if isinstance(dyn, DynamicQConv2d) else QLinear
        layer = cls.from_float(dyn, dyn.method, b, dyn.aq.signed)
        for src, dst in ((dyn.aq, layer.aq), (dyn.wq, layer.wq)):
            dst.basis = src.basis[k : k + 1, :, :b].clone()
            dst.initialized.fill_(True)
        parent, _, child = info.name.rpartition(".")
        setattr(backbone.get_submodule(parent), child, layer)
    return backbone.eval()


@pytest.mark.parametrize("execution", ["fast", "reference"])
def test_per_sample_equivalence_with_per_layer_static_model(execution):
    model = _dq(method="lqnets", execution=execution).double()
    _spread_controller(model)
    x = _varied_batch(8).double()
    _warm_up(model, x)
    state = {n: t.clone() for n, t in model.state_dict().items()}
    logits = model(x)
    rec = model.last
    assert torch.unique(rec.bits_w, dim=0).shape[0] > 1
    for n, t in model.state_dict().items():
        torch.testing.assert_close(t, state[n], **EXACT, msg=f"eval changed {n}")
    for j in range(x.shape[0]):
        alone = _per_layer_static_copy(model, rec.bits_w[j].tolist())(x[j : j + 1])
        torch.testing.assert_close(logits[j : j + 1], alone, atol=1e-9, rtol=1e-9)
        with model.forced_bits(rec.bits_w[j].tolist()):
            forced = model(x[j : j + 1])
        torch.testing.assert_close(logits[j : j + 1], forced, atol=1e-9, rtol=1e-9)


def test_each_candidate_keeps_its_own_basis_after_conversion():
    # Each candidate of a dynamic layer keeps a basis of its own length.
    model = _dq(method="lqnets", bits=(2, 3, 4))
    _warm_up(model, _varied_batch(4))
    layer = model.model.get_submodule("layer3.2.conv2")
    assert layer.wq.basis.shape == (3, layer.out_channels, 4)
    assert layer.aq.basis.shape == (3, 1, 4)
    for s, b in enumerate((2, 3, 4)):
        assert (layer.wq.basis[s, :, b:] == 0).all() and (layer.wq.basis[s, :, :b] != 0).all()
    assert list(itertools.chain(layer.wq.parameters(), layer.aq.parameters())) == []


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_first_forward_under_inference_mode_leaves_bases_usable(kind):
    """Lazy basis initialisation inside ``torch.inference_mode()`` must not create inference
    tensors: evaluation (weight cache) and training afterwards both work."""
    torch.manual_seed(0)
    fp, x = iq.models.resnet20(), torch.randn(4, 3, 32, 32)
    if kind == "static":
        model = iq.static(fp, method="lqnets", bits=3, example_input=x[:1])
    else:
        model = iq.dynamic(fp, iq.DynamicSpec(method="lqnets", bits=(2, 3)), example_input=x[:1])
    model.eval()
    with torch.inference_mode():
        first = model(x)
    assert not any(b.is_inference() for b in model.buffers())
    with torch.no_grad():
        torch.testing.assert_close(model(x), first, atol=0, rtol=0)
    model.train()
    F.cross_entropy(model(x), torch.arange(4)).backward()  # QEM updates the bases in place
