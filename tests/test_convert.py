"""iq.dynamic / iq.static: determinism, per-sample routing, per-sample equivalence, conversions."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import instaquant as iq
from instaquant.nn.layers import DynamicQConv2d, QConv2d, QLinear

X32 = (1, 3, 32, 32)


def _dq(method="pact", bits=(3, 4, 5), **kw):
    fp = iq.models.resnet20(num_classes=10)
    spec = iq.DynamicSpec(method=method, bits=bits, **kw)
    return iq.dynamic(fp, spec, example_input=torch.randn(*X32))


def _spread_controller(model, scale=3.0):
    """Controller weights that make the choice depend strongly on the input."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lin in (model.controller.fc1, model.controller.fc2):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * scale)
            lin.bias.zero_()


def _varied_batch(n, seed=0):
    """Inputs whose scale and offset differ per sample, so the tap features differ clearly."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 3.0, n).view(n, 1, 1, 1)
    shift = torch.randn(n, 3, 1, 1, generator=g)
    return torch.randn(n, 3, 32, 32, generator=g) * scale + shift


def _warm_up(model, x):
    """One training forward so data-dependent quantizer parameters are initialised."""
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def test_forward_record_and_budget_loss_backward():
    model = _dq()
    x = torch.randn(4, 3, 32, 32)
    logits = model(x)
    rec = model.last
    L = len(model.dynamic_layers)
    assert logits.shape == (4, 10)
    assert rec.bits_w.shape == rec.bits_a.shape == (4, L) == (4, 12)
    assert rec.bitops.shape == (4,) and rec.bitops.requires_grad
    loss = F.cross_entropy(logits, torch.arange(4)) + model.budget_loss()
    loss.backward()
    assert model.controller.fc2.weight.grad.abs().sum() > 0
    dyn = model.model.get_submodule("layer3.2.conv2")
    assert dyn.weight.grad.abs().sum() > 0 and dyn.aq.alpha.grad.abs().sum() > 0


def test_bitops_record_matches_chosen_bits():
    model = _dq()
    model.eval()
    x = torch.randn(6, 3, 32, 32)
    model(x)
    rec = model.last
    static = sum(i.macs * i.bits[0] ** 2 for i in model.layers if i.role == "static")
    macs = torch.tensor([i.macs for i in model.dynamic_layers], dtype=torch.float64)
    expected = (rec.bits_w.double() * rec.bits_a.double() * macs).sum(1) + static
    torch.testing.assert_close(rec.bitops.double(), expected)


def test_eval_is_deterministic_and_selections_depend_on_input():
    model = _dq()
    _spread_controller(model)
    x = _varied_batch(16)
    _warm_up(model, x)
    y1, b1 = model(x), model.last.bits_w.clone()
    y2, b2 = model(x), model.last.bits_w.clone()
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)
    torch.testing.assert_close(b1, b2, atol=0, rtol=0)
    distinct_rows = torch.unique(b1, dim=0).shape[0]
    assert distinct_rows > 1, "different inputs should get different bit-widths"
    assert set(b1.unique().tolist()) == {3.0, 4.0, 5.0}


def _per_layer_static_copy(model, chosen_bits):
    """The dynamic model's backbone with each dynamic layer replaced by a static layer at the
    bits chosen for one sample, quantizer parameters copied from that candidate's slot."""
    import copy

    backbone = copy.deepcopy(model.model)
    for handle in list(backbone.get_submodule(model.spec.tap)._forward_hooks):
        backbone.get_submodule(model.spec.tap)._forward_hooks.pop(handle)
    for info, bits in zip(model.dynamic_layers, chosen_bits, strict=True):
        dyn = model.model.get_submodule(info.name)
        k = dyn.bits.index(int(bits))
        cls = QConv2d if isinstance(dyn, DynamicQConv2d) else QLinear
        layer = cls.from_float(dyn, dyn.method, int(bits), dyn.aq.signed)
        for name in ("alpha", "step"):
            for src, dst in ((dyn.aq, layer.aq), (dyn.wq, layer.wq)):
                if hasattr(src, name):
                    getattr(dst, name).data[0] = getattr(src, name).data[k]
                    dst.initialized.fill_(True)
        parent, _, child = info.name.rpartition(".")
        setattr(backbone.get_submodule(parent), child, layer)
    return backbone.eval()


@pytest.mark.parametrize("method", ["pact", "lsq", "dorefa"])
@pytest.mark.parametrize("execution", ["fast", "reference"])
def test_per_sample_equivalence_with_per_layer_static_model(method, execution):
    # float64: a batch-of-8 and a batch-of-1 convolution differ by rounding noise, and in
    # float32 that can flip a quantization level; in float64 it practically never does.
    model = _dq(method=method, execution=execution).double()
    _spread_controller(model)
    x = _varied_batch(8).double()
    _warm_up(model, x)
    logits = model(x)
    rec = model.last
    assert torch.unique(rec.bits_w, dim=0).shape[0] > 1
    for j in range(x.shape[0]):
        alone = _per_layer_static_copy(model, rec.bits_w[j].tolist())(x[j : j + 1])
        torch.testing.assert_close(logits[j : j + 1], alone, atol=1e-9, rtol=1e-9)
        with model.forced_bits(rec.bits_w[j].tolist()):
            forced = model(x[j : j + 1])
        torch.testing.assert_close(logits[j : j + 1], forced, atol=1e-9, rtol=1e-9)


def test_fast_and_reference_agree_in_eval():
    model = _dq()
    _spread_controller(model)
    x = _varied_batch(8)
    _warm_up(model, x)
    fast = model(x)
    for layer in model.dynamic_modules():
        layer.execution = "reference"
    ref = model(x)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_batch_size_one_in_train_and_eval():
    model = _dq()
    x = torch.randn(1, 3, 32, 32)
    model.train()
    (model(x).sum() + model.budget_loss()).backward()
    model.eval()
    assert model(x).shape == (1, 10) and model.last.bits_w.shape == (1, 12)


def test_separate_weight_and_activation_choice():
    model = _dq(separate=True)
    _spread_controller(model)
    x = _varied_batch(8)
    out = model(x)
    assert model.last.selection.shape == (8, 12, 2, 3)
    (out.sum() + model.budget_loss()).backward()
    model.eval()
    model(x)
    assert (model.last.bits_w != model.last.bits_a).any()
    static = sum(i.macs * i.bits[0] ** 2 for i in model.layers if i.role == "static")
    macs = torch.tensor([i.macs for i in model.dynamic_layers], dtype=torch.float32)
    expected = (model.last.bits_w * model.last.bits_a * macs).sum(1) + static
    torch.testing.assert_close(model.last.bitops, expected)


def test_sampling_in_eval_only_when_asked():
    model = _dq(sample_in_eval=True)
    model.eval()
    x = torch.randn(32, 3, 32, 32)
    model(x)
    b1 = model.last.bits_w.clone()
    model(x)
    assert not torch.equal(b1, model.last.bits_w)


def test_layer_roles_first_last_and_tap():
    model = _dq()
    roles = {i.name: i.role for i in model.layers}
    assert roles["conv1"] == "fp" and roles["fc"] == "fp"
    assert all(roles[n] == "static" for n in roles if n.startswith("layer1"))
    assert all(roles[n] == "dynamic" for n in roles if n.startswith(("layer2", "layer3")))
    assert isinstance(model.model.layer1[0].conv1, QConv2d)
    assert model.model.layer1[0].conv1.bits == 4
    assert isinstance(model.model.layer2[0].conv1, DynamicQConv2d)
    assert type(model.model.conv1) is torch.nn.Conv2d

    eight = _dq(first_last="8bit", exclude=("layer3.2.*",))
    assert isinstance(eight.model.conv1, QConv2d) and eight.model.conv1.bits == 8
    assert isinstance(eight.model.fc, QLinear) and eight.model.fc.bits == 8
    assert type(eight.model.layer3[2].conv1) is torch.nn.Conv2d
    assert len(eight.dynamic_layers) == 10


def test_static_model_matches_dynamic_layer_choices():
    fp = iq.models.resnet20()
    qs = iq.static(fp, method="pact", bits=4, example_input=torch.randn(*X32))
    roles = {i.name: i.role for i in qs.layers}
    assert roles["conv1"] == "fp" and roles["fc"] == "fp"
    assert sum(r == "static" for r in roles.values()) == 18
    x = torch.randn(3, 3, 32, 32)
    qs(x).sum().backward()
    assert qs.last.bitops.shape == (3,)
    assert float(qs.last.bitops[0]) == qs.static_bitops(4) == 40_108_032 * 16
    assert fp.conv1.__class__ is torch.nn.Conv2d, "the user's model is left untouched"


def test_budget_loss_hinge():
    model = _dq(budget=iq.Budget(kind="bitops", target_bits=4, weight=2.0))
    model.train()
    model(torch.randn(4, 3, 32, 32))
    rel = model.last.bitops.mean() / model.static_bitops(4)
    torch.testing.assert_close(model.budget_loss(), 2.0 * torch.relu(rel - 1))
    bits_model = _dq(budget=iq.Budget(kind="bits", target_bits=3.5, weight=0.5))
    bits_model(torch.randn(4, 3, 32, 32))
    mean_bits = bits_model.last.bits_w.mean()
    torch.testing.assert_close(bits_model.budget_loss(), 0.5 * torch.relu(mean_bits - 3.5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=()), "bits is empty"),
        (dict(bits=(3, 9)), "allowed: integers 1..8"),
        (dict(bits=(0, 4)), "allowed: integers 1..8"),
        (dict(bits=(4, 4)), "repeats"),
        (dict(method="foo"), "allowed: dorefa, pact, lsq"),
        (dict(method="lsq", bits=(1, 2)), "needs bits >= 2"),
        (dict(first_last="none"), "allowed: fp, 8bit, quantize"),
    ],
)
def test_bad_spec_gives_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        iq.DynamicSpec(**kwargs)


def test_bad_budget_and_tap():
    with pytest.raises(ValueError, match="allowed: bitops, bits"):
        iq.Budget(kind="flops")
    with pytest.raises(ValueError, match="infeasible"):
        _dq(budget=iq.Budget(target_bits=2))
    with pytest.raises(ValueError, match="not found"):
        _dq(tap="layer9")


def test_single_candidate_works_as_static():
    model = _dq(bits=(4,))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    model(x)
    assert (model.last.bits_w == 4).all()
    torch.testing.assert_close(model.last.bitops, torch.full((2,), model.static_bitops(4)))


def test_static_eval_weight_cache_follows_updates():
    qs = iq.static(iq.models.resnet20(), method="lsq", bits=4, example_input=torch.randn(*X32))
    x = torch.randn(2, 3, 32, 32)
    qs.train()
    with torch.no_grad():
        qs(x)  # initialise the LSQ steps
    qs.eval()
    with torch.no_grad():
        before = qs(x)
        state = {
            k: v * 1.5 if k.endswith("conv1.weight") else v for k, v in qs.state_dict().items()
        }
        qs.load_state_dict(state)
        after = qs(x)
        fresh = iq.static(
            iq.models.resnet20(), method="lsq", bits=4, example_input=torch.randn(*X32)
        )
        fresh.load_state_dict(state)
        fresh.eval()
        expected = fresh(x)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, expected, atol=0, rtol=0)


def test_bitops_reference_counts_8bit_first_and_last_at_8_bits():
    """With ``first_last="8bit"`` the static reference is the static model's own cost, so a
    dynamic model at the reference bits everywhere is exactly on budget."""
    qs = iq.static(iq.models.resnet20(), "pact", 4, torch.randn(*X32), first_last="8bit")
    own = sum(i.macs * i.bits[0] ** 2 for i in qs.layers if i.role != "fp")
    assert qs.static_bitops(4) == own
    dq = _dq(first_last="8bit", budget=iq.Budget(target_bits=4))
    with dq.forced_bits([4] * len(dq.dynamic_layers)):
        dq(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(dq.last.bitops, torch.full((2,), dq.static_bitops(4)))
    assert float(dq.budget_loss()) == 0.0


def test_exclude_wins_over_8bit_first_and_last():
    model = _dq(first_last="8bit", exclude=("conv1", "fc"))
    roles = {i.name: (i.role, i.bits) for i in model.layers}
    assert roles["conv1"] == ("fp", ()) and roles["fc"] == ("fp", ())
    assert type(model.model.conv1) is torch.nn.Conv2d and type(model.model.fc) is torch.nn.Linear


def test_tap_that_runs_twice_is_refused():
    fp = iq.models.get("resnet18", num_classes=10)  # torchvision's BasicBlock calls relu twice
    spec = iq.DynamicSpec(method="pact", bits=(3, 4, 5), tap="layer1.0.relu")
    with pytest.raises(ValueError, match="'layer1.0.relu' runs more than once in a forward"):
        iq.dynamic(fp, spec, example_input=torch.randn(1, 3, 32, 32))


class _Aliased(torch.nn.Module):
    """A conv kept under two attribute names; the forward calls the second one."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.body = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.alias = self.body
        self.stage = torch.nn.Sequential(torch.nn.ReLU())
        self.tap_alias = self.stage
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = self.tap_alias(self.stem(x))
        return self.head(self.alias(x).mean((2, 3)))


def test_layer_under_two_names_is_quantized_under_both():
    spec = iq.DynamicSpec(method="pact", bits=(2, 8), tap="tap_alias")  # the tap by its alias
    model = iq.dynamic(_Aliased(), spec, example_input=torch.randn(1, 3, 8, 8))
    assert model.model.alias is model.model.body
    assert isinstance(model.model.alias, DynamicQConv2d)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), model.forced_bits([2]):
        low = model(x)
    with torch.no_grad(), model.forced_bits([8]):
        high = model(x)
    assert not torch.equal(low, high), "the layer the forward calls follows the chosen bits"


class _Standardized(torch.nn.Conv2d):
    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / 2
        return self._conv_forward(x, w, self.bias)


def test_conv_subclass_with_its_own_forward_is_refused_unless_excluded():
    fp = iq.models.resnet20()
    fp.layer2[0].conv1 = _Standardized(16, 32, 3, stride=2, padding=1, bias=False)
    with pytest.raises(ValueError, match=r"'layer2.0.conv1' is a _Standardized, a Conv2d with"):
        iq.dynamic(fp, iq.DynamicSpec(method="pact", bits=(3, 4)), torch.randn(*X32))
    spec = iq.DynamicSpec(method="pact", bits=(3, 4), exclude=("layer2.0.conv1",))
    model = iq.dynamic(fp, spec, torch.randn(*X32))
    assert type(model.model.layer2[0].conv1) is _Standardized


def test_costs_stay_exact_in_low_precision():
    """MACs overflow float16 and round in bfloat16: BitOPs are counted in float32 from integer
    buffers, whatever the model is cast to or autocast does."""
    dq = _dq()
    x = torch.randn(2, 3, 32, 32)
    with dq.forced_bits([4] * len(dq.dynamic_layers)), torch.no_grad():
        dq.eval()(x)
        exact = dq.last.bitops.clone()
        with torch.autocast("cpu", dtype=torch.float16):
            dq(x)
        torch.testing.assert_close(dq.last.bitops, exact, atol=0, rtol=0)
        low = copy.deepcopy(dq).to(torch.bfloat16)
        assert low.dynamic_macs.dtype == torch.int64
        low(x.to(torch.bfloat16))
        torch.testing.assert_close(low.last.bitops, exact, atol=0, rtol=0)
    assert exact.dtype == torch.float32 and torch.isfinite(exact).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dynamic_model_of_another_dtype_runs(dtype):
    fp = iq.models.resnet20().to(dtype)
    dq = iq.dynamic(fp, iq.DynamicSpec(bits=(3, 4)), torch.randn(1, 3, 32, 32, dtype=dtype))
    assert next(dq.controller.parameters()).dtype == dtype
    out = dq(torch.randn(2, 3, 32, 32, dtype=dtype))
    assert out.dtype == dtype and torch.isfinite(dq.budget_loss())


def test_other_input_size_warns_once_and_profile_refuses_it():
    dq = _dq()
    with pytest.warns(UserWarning, match=r"converted with an example of shape \(3, 32, 32\)"):
        dq(torch.randn(2, 3, 64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dq(torch.randn(2, 3, 64, 64))  # once per model
        dq(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"counted at its conversion example's shape"):
        iq.cost.profile(dq, torch.randn(1, 3, 64, 64))
    wrapped = torch.nn.Sequential(torch.nn.Identity(), dq)
    with pytest.raises(ValueError, match="profile the quantized model itself"):
        iq.cost.profile(wrapped, torch.randn(1, 3, 32, 32))


def test_exclude_as_one_string_and_unmatched_patterns():
    qs = iq.static(iq.models.resnet20(), "pact", 4, torch.randn(*X32), exclude="layer3*")
    fp_layers = {i.name for i in qs.layers if i.role == "fp"}
    assert fp_layers == {"conv1", "fc"} | {i.name for i in qs.layers if i.name.startswith("layer3")}
    assert iq.DynamicSpec(exclude="layer3.2.conv2").exclude == ("layer3.2.conv2",)
    with pytest.raises(ValueError, match="exclude pattern 'layer9.*' matches no Conv2d/Linear"):
        iq.static(iq.models.resnet20(), "pact", 4, torch.randn(*X32), exclude=["layer9.*"])


def test_forced_bits_checks_values_and_nests():
    dq = _dq().eval()
    L, x = len(dq.dynamic_layers), torch.randn(2, 3, 32, 32)
    for bad in (6, 3.7, "3"):
        with pytest.raises(ValueError, match=r"outside the candidates; allowed: 3, 4, 5"):
            with dq.forced_bits([bad] * L):
                pass
    with torch.no_grad(), dq.forced_bits([5] * L):
        with dq.forced_bits([3.0] * L):  # whole floats, as in last.bits_w, are fine
            dq(x)
            assert (dq.last.bits_w == 3).all()
        dq(x)
        assert (dq.last.bits_w == 5).all(), "the outer forced bits apply again"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(hidden=0), "hidden must be a positive integer, got 0"),
        (dict(hidden=2.5), "hidden must be a positive integer, got 2.5"),
        (dict(budget="bitops"), "budget must be an instaquant.Budget"),
        (dict(bits=4), r"bits must be a tuple of candidates, e.g. \(4,\)"),
        (dict(tau=float("nan")), "tau must be a finite number > 0, got nan"),
        (dict(tau="1"), "tau must be a finite number > 0, got '1'"),
        (dict(tau_final=0.0), "tau_final must be > 0, got 0.0"),
    ],
)
def test_dynamic_spec_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        iq.DynamicSpec(**kwargs)


def test_budget_temperature_and_signed_arguments_are_checked():
    for kwargs, message in (
        (dict(weight=float("nan")), "budget.weight must be finite, got nan"),
        (dict(target_bits="4"), "budget.target_bits must be a number, got '4'"),
        (dict(target_bitops=float("inf")), "budget.target_bitops must be finite, got inf"),
    ):
        with pytest.raises(ValueError, match=message):
            iq.Budget(**kwargs)
    with pytest.raises(ValueError, match="tau must be > 0, got 0"):
        _dq().set_temperature(0)
    with pytest.raises(ValueError, match="signed names unknown layers: nope"):
        iq.static(iq.models.resnet20(), "pact", 4, torch.randn(*X32), signed={"nope": True})


def test_last_is_cleared_by_a_forward_that_raises():
    dq = _dq()
    dq(torch.randn(4, 3, 32, 32))
    with pytest.raises(RuntimeError), pytest.warns(UserWarning, match="example of shape"):
        dq(torch.randn(2, 5, 32, 32))  # wrong channel count
    assert dq.last is None


def test_exclude_by_an_alias_keeps_the_layer_full_precision():
    model = _Aliased()
    spec = iq.DynamicSpec(
        method="pact",
        bits=(2, 8),
        tap="stage",
        exclude=("alias",),
        first_last="quantize",
        budget=iq.Budget(kind="bits", target_bits=8),
    )
    dq = iq.dynamic(model, spec, example_input=torch.randn(1, 3, 8, 8))
    assert type(dq.model.alias) is torch.nn.Conv2d and dq.model.alias is dq.model.body
    assert {i.name: i.role for i in dq.layers}["body"] == "fp"


def test_every_argument_is_documented_one_per_line():
    import dataclasses
    import inspect

    doc = iq.DynamicSpec.__doc__
    for f in dataclasses.fields(iq.DynamicSpec):
        assert f"\n        {f.name} (" in doc, f.name
    static_doc = iq.static.__doc__
    for name in inspect.signature(iq.static).parameters:
        assert f"\n        {name} (" in static_doc, name


def test_signed_plan_travels_in_the_state_dict():
    fp = iq.models.resnet20()
    example = torch.randn(1, 3, 16, 16)
    trained = iq.dynamic(fp, iq.DynamicSpec(signed={"layer2.0.conv1": True}), example)
    state = trained.state_dict()
    assert bool(state["model.layer2.0.conv1.aq.signed_input"])
    assert not bool(state["model.layer2.0.conv2.aq.signed_input"])
    rebuilt = iq.dynamic(fp, iq.DynamicSpec(), example)  # the probe finds layer2.0.conv1 unsigned
    with pytest.raises(RuntimeError, match=r"layer2\.0\.conv1\.aq quantizes signed values"):
        rebuilt.load_state_dict(state)
    same = iq.dynamic(fp, iq.DynamicSpec(signed={"layer2.0.conv1": True}), example)
    same.load_state_dict(state)
    # Checkpoints written before the plan was saved still load.
    same.load_state_dict({k: v for k, v in state.items() if not k.endswith(".signed_input")})
    from instaquant.checkpoint import CheckpointError, load_model_state

    with pytest.raises(CheckpointError, match="1 activation quantizers signed in one"):
        load_model_state(rebuilt, state, "the checkpoint")


def test_layer_bits_give_each_matching_layer_its_bits():
    fp = iq.models.resnet20()
    x = torch.randn(*X32)
    layer_bits = {"layer2.0.conv1": 5, "layer3.*": 4, "layer3.2.conv2": 2}  # first match wins
    mixed = iq.static(fp, "pact", 3, x, layer_bits=layer_bits)
    expected = {}
    for info in mixed.layers:
        if info.role == "fp":
            continue
        name = info.name
        expected[name] = 5 if name == "layer2.0.conv1" else 4 if name.startswith("layer3") else 3
        assert mixed.model.get_submodule(name).bits == expected[name], name
    macs = {i.name: i.macs for i in mixed.layers}
    assert float(mixed.bitops_per_sample) == sum(macs[n] * b * b for n, b in expected.items())
    assert mixed.layer_bits.tolist() == list(expected.values())

    # The same network as static 3-bit with those layers taken from static 5- and 4-bit.
    by_bits = {b: iq.static(fp, "pact", b, x).eval() for b in (3, 4, 5)}
    reference = copy.deepcopy(by_bits[3].model)
    for name, b in expected.items():
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent), child, by_bits[b].model.get_submodule(name))
    batch = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(mixed.eval()(batch), reference(batch), atol=0, rtol=0)
        # Fresh models: a quantizer's first forward sets its lazy parameters.
        every = iq.static(fp, "pact", 3, x, layer_bits={"*": 4}).eval()
        static4 = iq.static(fp, "pact", 4, x).eval()
        torch.testing.assert_close(every(batch), static4(batch), atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layer_bits={"layr3.*": 4}), "pattern 'layr3.*' matches no quantized layer"),
        (dict(layer_bits={"conv1": 4}), "pattern 'conv1' matches no quantized layer"),
        (dict(layer_bits={"layer3.*": 9}), r"layer_bits\['layer3.\*'\] contains 9"),
        (dict(layer_bits={"layer3.*": 4}, first_last="8bit", exclude=()), None),
        (dict(layer_bits={"*": 4}, first_last="8bit", exclude=()), None),
        (dict(layer_bits={"fc": 4}, first_last="8bit"), "names only fc, pinned at 8 bits"),
    ],
)
def test_bad_layer_bits_are_refused_in_one_line(kwargs, message):
    fp = iq.models.resnet20()
    if message is None:  # the pinned first and last layers keep their 8 bits
        model = iq.static(fp, "pact", 3, torch.randn(*X32), **kwargs)
        assert model.model.fc.bits == 8 and model.model.layer3[0].conv1.bits == 4
        return
    with pytest.raises(ValueError, match=message) as info:
        iq.static(fp, "pact", 3, torch.randn(*X32), **kwargs)
    assert "\n" not in str(info.value)
