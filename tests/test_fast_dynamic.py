"""Fast dynamic execution against the reference mixture: outputs and every gradient.

Layer-level tests run in float64 and hold the fast training path to the reference mixture
``Σ_k m_k · op(Q^a_k(x), Q^w_k(W))``: the output exactly (both compute the same branch
values), every gradient (input, weight, bias, quantizer α/step, selection logits) to
float64 rounding. Model-level tests do the same through a whole dynamic ResNet-20 with the
controller's Gumbel sampling replayed from one seed.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import assert_models_match, dynamic_resnet20, seeded_train_step, varied_images
from instaquant import convert
from instaquant.nn import fast_dynamic
from instaquant.nn.layers import DynamicQConv2d, DynamicQLinear
from instaquant.nn.routing import plan_keys, plan_layers, put_rows, route, take_rows
from instaquant.quant.methods import make_activation_quantizer

EXACT = dict(atol=0, rtol=0)
GRAD = dict(atol=1e-12, rtol=1e-10)
K = 3


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _layer(kind="conv", method="pact", signed=False, lazy=False, **conv_kw):
    """A float64 dynamic layer; its clips/steps set so that some inputs fall outside the range."""
    if kind == "conv":
        kw = dict(in_channels=6, out_channels=8, kernel_size=3, padding=1, bias=True) | conv_kw
        base = nn.Conv2d(**kw)
        layer = DynamicQConv2d.from_float(base, method, (3, 4, 5), signed)
    else:
        layer = DynamicQLinear.from_float(nn.Linear(12, 7), method, (3, 4, 5), signed)
    layer.double()
    if not lazy:
        with torch.no_grad():
            if method == "pact":
                layer.aq.alpha.copy_(torch.tensor([0.9, 1.2, 1.6]))
            if method == "lsq":
                layer.aq.step.copy_(torch.tensor([0.5, 0.25, 0.12]))
                layer.wq.step.copy_(torch.tensor([0.2, 0.1, 0.05]))
            for q in (layer.aq, layer.wq):
                if hasattr(q, "initialized"):
                    q.initialized.fill_(True)
    return layer


def _input(layer, batch, seed=0, tokens=False):
    """A conv's feature maps, a linear's vectors, or with ``tokens`` a linear's ``[B, 5, 12]``."""
    g = _gen(seed)
    shape = (batch, 6, 9, 9) if isinstance(layer, nn.Conv2d) else (batch, 12)
    shape = (batch, 5, 12) if tokens else shape
    scale = torch.linspace(0.3, 2.0, batch).reshape(batch, *[1] * (len(shape) - 1))
    return (torch.randn(shape, generator=g) * scale + 0.3).double()


def _choices(name, batch):
    """Per-sample candidate indices for the selection patterns under test."""
    if name == "mixed":
        return torch.arange(batch) % K
    if name == "two_of_three":  # candidate 1 never chosen
        return torch.where(torch.arange(batch) % 3 == 0, 2, 0)
    if name == "all_same":
        return torch.full((batch,), 1)
    raise ValueError(name)


def _selection(choice, seed=0, separate=False, grad=True):
    """A hard straight-through selection (like Gumbel-Softmax's) with ``choice`` as its argmax.

    Returns the leaf logits (to read their gradient) and the one-hot: ``one_hot - p.detach() + p``.
    With ``separate`` the activations choose ``(k + 1) mod K``, unlike the weights.
    """
    shape = (choice.shape[0], 2, K) if separate else (choice.shape[0], K)
    logits = torch.randn(shape, generator=_gen(seed + 100), dtype=torch.float64)
    logits.requires_grad_(grad)
    p = logits.softmax(-1)
    idx = torch.stack([choice, (choice + 1) % K], 1) if separate else choice
    hard = F.one_hot(idx, K).double()
    return logits, hard - p.detach() + p


def _run(layer, x, choice, separate=False, seed=0, grad=True):
    """Forward + a random linear loss + backward; returns output and all gradients."""
    x = x.clone().requires_grad_(grad)
    logits, sel = _selection(choice, seed, separate, grad)
    layer.selection = (sel[:, 0], sel[:, 1]) if separate else sel
    out = layer(x)
    r = torch.randn(out.shape, generator=_gen(seed + 7), dtype=out.dtype)
    if not grad:
        return out, {}
    (out * r).sum().backward()
    grads = {"x": x.grad, "logits": logits.grad}
    grads |= {n: p.grad for n, p in layer.named_parameters()}
    return out, grads


def _compare(fast_layer, ref_layer, x, choice, separate=False):
    ref_layer.execution = "reference"
    out_f, g_f = _run(fast_layer, x, choice, separate)
    out_r, g_r = _run(ref_layer, x, choice, separate)
    torch.testing.assert_close(out_f, out_r, **EXACT)
    assert g_f.keys() == g_r.keys()
    for name in g_r:
        assert g_r[name] is not None and g_f[name] is not None, name
        torch.testing.assert_close(g_f[name], g_r[name], **GRAD, msg=lambda m, n=name: f"{n}: {m}")
    return g_f


@pytest.mark.parametrize("method", ["pact", "lsq", "dorefa"])
@pytest.mark.parametrize("pattern", ["mixed", "two_of_three", "all_same"])
@pytest.mark.parametrize("kind", ["conv", "linear", "tokens"])
def test_layer_matches_reference_joint(method, pattern, kind):
    layer = _layer("conv" if kind == "conv" else "linear", method)
    ref = copy.deepcopy(layer)
    x = _input(layer, 9, tokens=kind == "tokens")
    grads = _compare(layer, ref, x, _choices(pattern, 9))
    # The test would be empty if nothing reached the quantizer parameters or the controller.
    assert grads["logits"].abs().sum() > 0 and grads["weight"].abs().sum() > 0
    for name, g in grads.items():
        if name.endswith(("alpha", "step")):
            assert g.abs().sum() > 0, name


@pytest.mark.parametrize("method", ["pact", "lsq"])
@pytest.mark.parametrize("pattern", ["mixed", "all_same"])
def test_layer_matches_reference_separate(method, pattern):
    layer = _layer("conv", method)
    _compare(layer, copy.deepcopy(layer), _input(layer, 9), _choices(pattern, 9), separate=True)


@pytest.mark.parametrize("method", ["pact", "lsq", "dorefa"])
@pytest.mark.parametrize("separate", [False, True])
def test_layer_batch_size_one(method, separate):
    layer = _layer("conv", method)
    _compare(layer, copy.deepcopy(layer), _input(layer, 1), torch.tensor([2]), separate)


@pytest.mark.parametrize(
    "conv_kw",
    [
        dict(stride=2, bias=False),
        dict(groups=2, dilation=2, padding=2),
        dict(in_channels=6, out_channels=6, groups=6),  # depthwise (MobileNet)
        dict(padding_mode="reflect"),
        dict(padding_mode="circular", kernel_size=(3, 1), padding=(1, 0)),
        dict(padding="same"),  # handled by the reference fallback
    ],
)
def test_conv_variants_match_reference(conv_kw):
    layer = _layer("conv", "pact", **conv_kw)
    _compare(layer, copy.deepcopy(layer), _input(layer, 7), _choices("mixed", 7))


def test_signed_activation_quantizer():
    layer = _layer("conv", "pact", signed=True)
    _compare(layer, copy.deepcopy(layer), _input(layer, 8) - 0.8, _choices("mixed", 8))


def test_lazy_init_sees_the_whole_batch():
    """The first call initialises PACT's α from the full batch, not from a candidate's rows."""
    for method in ("pact", "lsq"):
        layer = _layer("conv", method, lazy=True)
        ref = copy.deepcopy(layer)
        x = _input(layer, 9)
        _compare(layer, ref, x, _choices("mixed", 9))
        for name, value in layer.aq.named_parameters():
            torch.testing.assert_close(value, getattr(ref.aq, name), **EXACT)
            assert (value != 1.0).all(), "initialised from the data"
        assert bool(layer.aq.initialized.all())


def test_soft_selection_falls_back_to_the_reference():
    layer = _layer("conv", "pact")
    ref = copy.deepcopy(layer)
    ref.execution = "reference"
    x = _input(layer, 5)
    soft = torch.softmax(torch.randn(5, K, generator=_gen(3), dtype=torch.float64), -1)
    outs = []
    for lay in (layer, ref):
        lay.selection = soft
        outs.append(lay(x.clone().requires_grad_(True)))
    torch.testing.assert_close(outs[0], outs[1], **EXACT)
    assert fast_dynamic.plan_from_selection(soft) is None


def test_plan_needs_exactly_one_choice_per_sample():
    hard = F.one_hot(torch.tensor([2, 0, 1]), K).double()
    plan = fast_dynamic.plan_from_selection(hard)
    assert plan.index.tolist() == [2, 0, 1] and plan.counts == (1, 1, 1)
    assert [r.tolist() for r in plan.rows] == [[1], [2], [0]]
    # As many non-zeros as samples, but two in one row and none in another: not one-hot.
    uneven = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert fast_dynamic.plan_from_selection(uneven) is None


class _CallRecorder(TorchDispatchMode):
    """Batch sizes of every convolution forward/backward that runs under it, and every op's name."""

    def __init__(self):
        super().__init__()
        self.forward, self.backward, self.ops = [], [], []

    def count(self, op: str) -> int:
        """Calls of ``op``, in-place and out= variants included."""
        return sum(name.split(".")[0].rstrip("_") == op for name in self.ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        if func is torch.ops.aten.convolution.default:
            self.forward.append(args[0].shape[0])
        elif func is torch.ops.aten.convolution_backward.default:
            self.backward.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("pattern", ["mixed", "two_of_three", "all_same"])
def test_backward_runs_only_on_selected_branches(pattern):
    layer = _layer("conv", "pact")
    x = _input(layer, 9)
    choice = _choices(pattern, 9)
    calls = []
    layer.wq.register_forward_hook(lambda *a: calls.append(1))
    with _CallRecorder() as rec:
        _run(layer, x, choice)
    assert rec.forward == [9] * K, "every branch's forward runs on the whole batch"
    counts = torch.bincount(choice, minlength=K)
    assert sorted(rec.backward) == sorted(c for c in counts.tolist() if c > 0)
    assert len(calls) == K, "each candidate's quantized weight is computed once"


def test_reference_runs_every_branch_backward():
    """Control for the test above: the mixture differentiates all K branches on all samples."""
    layer = _layer("conv", "pact")
    layer.execution = "reference"
    with _CallRecorder() as rec:
        _run(layer, _input(layer, 9), _choices("mixed", 9))
    assert rec.backward == [9] * K


def test_dispatch_between_paths(monkeypatch):
    layer = _layer("conv", "pact")
    x = _input(layer, 6)
    seen = []
    monkeypatch.setattr(layer, "routed_forward", lambda *a: seen.append("routed") or x)
    spy = _Spy(seen, fast_dynamic._SelectedBranches)
    monkeypatch.setattr(fast_dynamic, "_SelectedBranches", spy)
    _run(layer, x, _choices("mixed", 6))  # grad needed: exact-gradient path
    layer.eval()
    _run(layer, x, _choices("mixed", 6))  # eval with autograd on: still the gradient path
    with torch.no_grad():
        _run(layer, x, _choices("mixed", 6), grad=False)
    for p in layer.parameters():
        p.requires_grad_(False)
    _run(layer, x, _choices("mixed", 6), grad=False)  # nothing can receive a gradient
    assert seen == ["mixture", "mixture", "routed", "routed"]


class _Spy:
    def __init__(self, seen, function):
        self.seen, self.function = seen, function

    def apply(self, *args):
        self.seen.append("mixture")
        return self.function.apply(*args)


# --------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("pattern", ["mixed", "two_of_three", "all_same"])
@pytest.mark.parametrize("batch", [1, 9])
@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("kind", ["conv", "tokens"])
def test_routed_eval_matches_reference(pattern, batch, separate, kind):
    layer = _layer("conv" if kind == "conv" else "linear", "pact")
    x = _input(layer, batch, tokens=kind == "tokens")
    choice = _choices(pattern, batch)
    _run(layer, x, choice, separate)  # a training step first, like a real model
    layer.selection = None
    layer.eval()
    ref = copy.deepcopy(layer)
    ref.execution = "reference"
    with torch.no_grad():
        out_f, _ = _run(layer, x, choice, separate, grad=False)
        out_r, _ = _run(ref, x, choice, separate, grad=False)
    # Routing convolves each candidate's rows apart: float64 rounding differs from the mixture.
    torch.testing.assert_close(out_f, out_r, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("pattern", ["mixed", "two_of_three", "all_same"])
def test_routed_eval_keeps_channels_last(pattern):
    layer = _layer("conv", "pact").eval().to(memory_format=torch.channels_last)
    x = _input(layer, 9)
    choice = _choices(pattern, 9)
    with torch.no_grad():
        out_plain, _ = _run(layer, x, choice, grad=False)
        out_cl, _ = _run(layer, x.contiguous(memory_format=torch.channels_last), choice, grad=False)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, out_plain, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_row_gather_and_scatter_keep_the_layout(fmt):
    x = torch.randn(7, 5, 3, 4).contiguous(memory_format=fmt)
    index = torch.tensor([6, 0, 3, 3])
    rows = take_rows(x, index)
    torch.testing.assert_close(rows, x[index], **EXACT)
    assert rows.is_contiguous(memory_format=fmt)
    out = torch.zeros(7, 5, 3, 4).contiguous(memory_format=fmt)
    put_rows(out, torch.tensor([5, 1]), x[:2])
    expected = torch.zeros(7, 5, 3, 4)
    expected[5], expected[1] = x[0], x[1]
    torch.testing.assert_close(out, expected, **EXACT)
    assert out.is_contiguous(memory_format=fmt)


def test_route_puts_outputs_back_in_input_order():
    x = torch.arange(10.0).reshape(10, 1)
    key = torch.tensor([2, 0, 2, 1, 0, 0, 2, 1, 1, 0])
    quantized, calls = [], []

    def quantize(rows, keys, owned):
        quantized.append((keys if isinstance(keys, int) else keys.tolist(), owned))
        return rows.mul_(10) if owned else rows * 10

    def branch(k, rows):
        calls.append((k, rows.shape[0]))
        return rows + k

    out = route(x, plan_keys(key, 3), quantize, branch)
    torch.testing.assert_close(out, x * 10 + key.reshape(10, 1).float(), **EXACT)
    assert quantized == [([0, 0, 0, 0, 1, 1, 1, 2, 2, 2], True)]  # one call, rows sorted by key
    assert calls == [(0, 4), (1, 3), (2, 3)]
    torch.testing.assert_close(x, torch.arange(10.0).reshape(10, 1), **EXACT)  # input untouched
    quantized.clear(), calls.clear()
    route(x, plan_keys(torch.ones(10, dtype=torch.long), 3), quantize, branch)  # one group
    assert quantized == [(1, False)] and calls == [(1, 10)]


@pytest.mark.parametrize("method", ["pact", "dorefa", "lsq", "lqnets"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("grouped", [False, True])
def test_infer_rows_gives_each_row_its_candidates_value(method, signed, share, grouped):
    if method == "lqnets" and share:
        pytest.skip("LQ-Nets keeps one basis per bit-width: no shared parameters")
    q = make_activation_quantizer(method, (2, 3, 5), signed, share)
    x = _input(_layer("conv", method), 12).float()
    with torch.no_grad():
        q(x, 0)  # lazy initialisation, as in a first training batch
        q.eval()
        index = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1, 0, 0, 1, 2])
        if grouped:  # as routing passes them: rows sorted by candidate
            index = index.sort().values
        expected = torch.cat([q(x[b : b + 1], int(index[b])) for b in range(12)])
        got = q.infer_rows(x.clone(), index)
        given = x.clone()
        got_inplace = q.infer_rows(given, index, inplace=True)
    torch.testing.assert_close(got, expected, **EXACT)
    torch.testing.assert_close(got_inplace, expected, **EXACT)
    assert got_inplace.data_ptr() == given.data_ptr()


def test_default_infer_rows_moves_no_rows_when_grouped():
    q = make_activation_quantizer("lqnets", (2, 3, 5), False, False)  # no per-row form
    x = _input(_layer("conv", "lqnets"), 9).float()
    with torch.no_grad():
        q(x, 0)
        q.eval()
        with _CallRecorder() as ops:
            q.infer_rows(x.clone(), torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2]), inplace=True)
        assert ops.count("index_select") == 0 and ops.count("index_copy") == 0
        with _CallRecorder() as ops:
            q.infer_rows(x.clone(), torch.tensor([0, 1, 0, 1, 1, 2, 2, 2, 2]), inplace=True)
        assert ops.count("index_select") == 3, "ungrouped rows: one gather per candidate"


@pytest.mark.parametrize("pattern", ["mixed", "two_of_three", "all_same"])
def test_routed_eval_convolves_each_sample_once(pattern):
    layer = _layer("conv", "pact").eval()
    choice = _choices(pattern, 9)
    with torch.no_grad(), _CallRecorder() as rec:
        _run(layer, _input(layer, 9), choice, grad=False)
    counts = torch.bincount(choice, minlength=K).tolist()
    assert sorted(rec.forward) == sorted(c for c in counts if c > 0)


def test_eval_weight_cache_is_invalidated():
    layer = _layer("conv", "lsq")
    x = _input(layer, 6)
    _run(layer, x, _choices("mixed", 6))  # initialise the LSQ steps
    layer.eval()
    fresh = lambda k: layer.wq(layer.weight, k).detach()  # noqa: E731
    with torch.no_grad():
        first = layer.quantized_weight(1)
        assert layer.quantized_weight(1) is first, "cached in eval mode"
        torch.testing.assert_close(first, fresh(1), **EXACT)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    _run(layer, x, _choices("mixed", 6))
    opt.step()  # in-place update of weight and step
    with torch.no_grad():
        torch.testing.assert_close(layer.quantized_weight(1), fresh(1), **EXACT)
        assert not torch.equal(layer.quantized_weight(1), first)
        state = copy.deepcopy(layer.state_dict())
        state["wq.step"].mul_(2)
        layer.load_state_dict(state)
        torch.testing.assert_close(layer.quantized_weight(1), fresh(1), **EXACT)
        cached = layer.quantized_weight(1)
    layer.train()
    layer.eval()
    with torch.no_grad():
        assert layer.quantized_weight(1) is not cached, "train() clears the cache"


@pytest.mark.parametrize("update", ["fused_adam", "data_write"])
def test_eval_weight_cache_survives_updates_without_version_bump(update):
    """Training in eval mode (frozen batch norms) with an optimizer step or weight write that
    bumps no version counter: the next evaluation must still see the new weights."""
    layer = _layer("conv", "pact").eval()
    x = _input(layer, 6)
    fresh = lambda k: layer.wq(layer.weight, k).detach()  # noqa: E731
    with torch.no_grad():
        first = layer.quantized_weight(1)
    _run(layer, x, _choices("mixed", 6))  # a training step's forward and backward, eval mode
    version = layer.weight._version
    if update == "fused_adam":
        torch.optim.Adam(layer.parameters(), lr=0.5, fused=True).step()
    else:
        layer.weight.data.copy_(torch.randn(layer.weight.shape, generator=_gen(4)))
    assert layer.weight._version == version, "the update must bypass the version counter"
    with torch.no_grad():
        assert not torch.equal(fresh(1), first)
        torch.testing.assert_close(layer.quantized_weight(1), fresh(1), atol=0, rtol=0)


# --------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("method", ["pact", "lsq"])
def test_model_train_step_matches_reference(method):
    fast = dynamic_resnet20(method)
    ref = copy.deepcopy(fast)
    x, y = varied_images(8), torch.arange(8)
    rec = assert_models_match(fast, ref, x, y)
    assert torch.unique(rec.bits_w, dim=0).shape[0] > 1, "samples should choose differently"
    assert fast.controller.fc2.weight.grad.abs().sum() > 0
    aq = fast.model.layer3[2].conv2.aq
    assert (aq.alpha if method == "pact" else aq.step).grad.abs().sum() > 0


def test_model_separate_choice_matches_reference():
    fast = dynamic_resnet20("pact", separate=True)
    assert_models_match(fast, copy.deepcopy(fast), varied_images(6), torch.arange(6))


def test_model_batch_size_one_and_all_same_candidate():
    fast = dynamic_resnet20("pact")
    assert_models_match(fast, copy.deepcopy(fast), varied_images(1), torch.tensor([3]))
    same = dynamic_resnet20("pact", bias=torch.tensor([0.0, 40.0, 0.0], dtype=torch.float64))
    rec = assert_models_match(same, copy.deepcopy(same), varied_images(6), torch.arange(6))
    assert (rec.bits_w == 4).all()


def test_model_eval_mode_with_gradients_matches_reference():
    fast = dynamic_resnet20("pact")
    x, y = varied_images(6), torch.arange(6)
    seeded_train_step(fast, x, y)  # initialise the quantizers
    fast.zero_grad()
    ref = copy.deepcopy(fast)
    fast.eval()
    ref.eval()
    assert_models_match(fast, ref, x, y)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("batch", [1, 7])
def test_model_routed_eval_matches_reference(separate, batch):
    fast = dynamic_resnet20("pact", separate=separate)
    fast(varied_images(8))  # a training-mode pass: batch norms and quantizer ranges set
    ref = copy.deepcopy(fast)
    for layer in ref.dynamic_modules():
        layer.execution = "reference"
    fast.eval(), ref.eval()
    x = varied_images(batch)
    with torch.no_grad():
        out_f, out_r = fast(x), ref(x)
    torch.testing.assert_close(out_f, out_r, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fast.last.bits_w, ref.last.bits_w, **EXACT)
    if batch > 1:
        assert len(torch.unique(fast.last.bits_w)) > 1, "the batch must be split to test routing"
    for layer in fast.dynamic_modules():  # choices and plans are per call
        assert layer.route_plan is None and layer.selection is None


def test_routing_planned_once_per_forward_and_only_when_used(monkeypatch):
    calls = []
    real = convert.plan_layers
    monkeypatch.setattr(convert, "plan_layers", lambda *a: calls.append(1) or real(*a))
    fast = dynamic_resnet20("pact")
    fast(varied_images(4))  # training mode: no plan
    with torch.no_grad():
        fast(varied_images(4))  # training mode without gradients (lazy init, DDP sync): none
    assert calls == []
    fast.eval()
    with torch.no_grad():
        fast(varied_images(4))
    assert calls == [1]
    for layer in fast.dynamic_modules():
        layer.execution = "reference"
    with torch.no_grad():
        fast(varied_images(4))
    assert calls == [1], "a model of reference layers routes nothing and plans nothing"


def test_plan_layers_matches_per_layer_sorting():
    keys = torch.randint(0, 4, (11, 5), generator=_gen(3))
    for i, plan in enumerate(plan_layers(keys, 4)):
        key = keys[:, i]
        torch.testing.assert_close(plan.key, key, **EXACT)
        assert plan.counts == torch.bincount(key, minlength=4).tolist()
        torch.testing.assert_close(plan.order, torch.argsort(key, stable=True), **EXACT)
        torch.testing.assert_close(plan.sorted_key, key[plan.order], **EXACT)


@pytest.mark.parametrize("method", ["lqnets", "pact"])
def test_training_mode_without_grad_matches_reference(method):
    """A no-grad forward in training mode (lazy initialisation, the DDP set-up pass) updates
    stateful quantizers as the mixture does: every candidate sees the whole batch."""
    fast = dynamic_resnet20(method)
    ref = copy.deepcopy(fast)
    for layer in ref.dynamic_modules():
        layer.execution = "reference"
    x = varied_images(8)
    with torch.no_grad():
        torch.manual_seed(3)
        out_f = fast(x)
        torch.manual_seed(3)
        out_r = ref(x)
    assert len(torch.unique(fast.last.bits_w)) > 1, "the batch must be split"
    torch.testing.assert_close(out_f, out_r, atol=1e-12, rtol=1e-12)
    for (name, a), b in zip(fast.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)
