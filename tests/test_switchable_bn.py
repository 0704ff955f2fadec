"""Switchable BatchNorm: each candidate's BN on its own rows, equal to plain BNs fed those rows."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from instaquant.models import resnet20
from instaquant.nn.switchable_bn import (
    SwitchableBatchNorm1d,
    SwitchableBatchNorm2d,
    find_following_bns,
    swap_switchable_bns,
)

K = 3


def exact(a, b):
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def trained_bn(channels: int = 4) -> nn.BatchNorm2d:
    """A BN with non-trivial affine parameters and running statistics."""
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    for _ in range(3):
        bn(torch.randn(8, channels, 5, 5) * 2 + 1)
    return bn


def diverged(bn: nn.BatchNorm2d) -> SwitchableBatchNorm2d:
    """A switchable BN whose candidates differ in statistics and affine parameters."""
    sbn = SwitchableBatchNorm2d.from_bn(bn, K)
    for k, cand in enumerate(sbn.bns):
        cand(torch.randn(6, bn.num_features, 5, 5) * (k + 1) + k)
        with torch.no_grad():
            cand.weight.mul_(1 + 0.3 * k)
            cand.bias.add_(0.2 * k)
    return sbn


def assert_same_state(a: nn.BatchNorm2d, b: nn.BatchNorm2d) -> None:
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(ta, tb, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("training", [True, False])
def test_one_candidate_equals_original_bn(training):
    bn = trained_bn().train(training)
    sbn = SwitchableBatchNorm2d.from_bn(copy.deepcopy(bn), K)
    x = torch.randn(5, 4, 6, 6)
    for k in range(K):
        ref = copy.deepcopy(bn)
        sbn.set_selection(torch.full((5,), k))
        exact(sbn(x), ref(x))
        assert_same_state(sbn.bns[k], ref)


def test_mixed_selection_in_training_is_each_bn_on_its_rows():
    bn = trained_bn()
    sbn = SwitchableBatchNorm2d.from_bn(bn, 4)
    refs = [copy.deepcopy(c) for c in sbn.bns]
    x = torch.randn(7, 4, 5, 5)
    # Candidate 0 has four rows, 1 has one (batch statistics over its 5x5 values), 3 has two,
    # 2 has none.
    index = torch.tensor([3, 0, 0, 1, 3, 0, 0])
    sbn.set_selection(index)
    out = sbn(x)
    for k, ref in enumerate(refs):
        rows = (index == k).nonzero().flatten()
        if len(rows):
            exact(out[rows], ref(x[rows]))
        assert_same_state(sbn.bns[k], ref)  # candidate 2, fed nothing, is untouched
    assert int(sbn.bns[2].num_batches_tracked) == int(bn.num_batches_tracked)


def test_training_gradients_match_per_candidate_reference():
    sbn = diverged(trained_bn()).train()
    refs = copy.deepcopy(sbn.bns)
    x = torch.randn(8, 4, 5, 5, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    index = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0])
    g = torch.randn(8, 4, 5, 5)

    sbn.set_selection(index)
    (sbn(x) * g).sum().backward()
    out_ref = torch.zeros_like(g)
    for k, ref in enumerate(refs):
        rows = (index == k).nonzero().flatten()
        out_ref = out_ref.index_put((rows,), ref(x_ref[rows]))
    (out_ref * g).sum().backward()

    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-6)
    for cand, ref in zip(sbn.bns, refs, strict=True):
        torch.testing.assert_close(cand.weight.grad, ref.weight.grad, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(cand.bias.grad, ref.bias.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_mixed_selection_is_per_row_running_stats(channels_last):
    sbn = diverged(trained_bn()).eval()
    x = torch.randn(6, 4, 5, 5, requires_grad=True)
    xin = x.to(memory_format=torch.channels_last) if channels_last else x
    index = torch.tensor([1, 0, 2, 2, 1, 0])
    sbn.set_selection(index)
    out = sbn(xin)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    ref = []
    for b, k in enumerate(index.tolist()):
        c = sbn.bns[k]
        y = F.batch_norm(x[b : b + 1], c.running_mean, c.running_var, c.weight, c.bias, eps=c.eps)
        ref.append(y)
    ref = torch.cat(ref)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)

    g = torch.randn_like(ref)
    grads = torch.autograd.grad((out * g).sum(), [x, *sbn.parameters()])
    grads_ref = torch.autograd.grad((ref * g).sum(), [x, *sbn.parameters()])
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_training_keeps_channels_last():
    sbn = diverged(trained_bn()).train()
    ref = copy.deepcopy(sbn)
    x = torch.randn(6, 4, 5, 5)
    index = torch.tensor([1, 0, 2, 2, 1, 0])
    sbn.set_selection(index)
    ref.set_selection(index)
    out = sbn(x.to(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref(x), atol=1e-6, rtol=1e-6)


def test_batchnorm1d():
    bn = nn.BatchNorm1d(4)
    bn(torch.randn(16, 4) + 1)
    sbn = SwitchableBatchNorm1d.from_bn(bn, K)
    x, index = torch.randn(6, 4), torch.tensor([0, 1, 1, 0, 2, 2])
    sbn.set_selection(index)
    out = sbn(x)
    for k in range(K):
        rows = (index == k).nonzero().flatten()
        exact(out[rows], copy.deepcopy(bn)(x[rows]))
    sbn.eval()
    ref = torch.cat([sbn.bns[k](x[b : b + 1]) for b, k in enumerate(index.tolist())])
    torch.testing.assert_close(sbn(x), ref, atol=1e-6, rtol=1e-6)


def test_selection_errors():
    sbn = SwitchableBatchNorm2d.from_bn(nn.BatchNorm2d(4), K)
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="without a selection"):
        sbn(x)
    sbn.set_selection(torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="3 samples but the input has 2"):
        sbn(x)
    sbn.set_selection(torch.tensor([0, K]))
    with pytest.raises(RuntimeError, match="outside"):
        sbn(x)
    sbn.set_selection(F.one_hot(torch.tensor([0, 1]), K))
    with pytest.raises(RuntimeError, match="argmax"):
        sbn(x)


def test_state_dict_round_trip():
    sbn = diverged(trained_bn())
    state = sbn.state_dict()
    assert {k.split(".")[1] for k in state} == {str(k) for k in range(K)}
    fresh = SwitchableBatchNorm2d.from_bn(nn.BatchNorm2d(4), K)
    fresh.load_state_dict(state)
    for a, b in zip(fresh.bns, sbn.bns, strict=True):
        assert_same_state(a, b)


def test_find_and_swap_in_resnet20():
    model = resnet20()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    pairs = find_following_bns(model, torch.randn(2, 3, 8, 8), convs)
    # Option-A shortcuts hold no conv: every conv is followed by its block's BN, nothing else.
    expected = {n.replace("conv", "bn"): n for n in convs}
    assert pairs == expected and len(pairs) == 19
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

    x = torch.randn(4, 3, 8, 8)
    before = model.eval()(x)
    swapped = swap_switchable_bns(model, pairs, K)
    assert set(swapped) == set(convs)
    assert model.get_submodule("layer2.0.bn1") is swapped["layer2.0.conv1"]
    for k in range(K):  # every sample on one candidate: the original network, exactly
        for m in swapped.values():
            m.set_selection(torch.full((4,), k))
        exact(model(x), before)
    # An already swapped model pairs nothing more (the copies inside are not candidates).
    for m in swapped.values():
        m.set_selection(torch.zeros(2, dtype=torch.long))
    assert find_following_bns(model, torch.randn(2, 3, 8, 8), convs) == {}


def test_bn_after_activation_is_not_paired():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
    )
    pairs = find_following_bns(model, torch.randn(1, 3, 8, 8), ["0", "3"])
    assert pairs == {"4": "3"}
    swapped = swap_switchable_bns(model, pairs, K)
    assert isinstance(model[4], SwitchableBatchNorm2d) and swapped == {"3": model[4]}
    assert isinstance(model[2], nn.BatchNorm2d)


def test_swap_replaces_every_name_of_a_shared_bn():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.alias = model[1]
    pairs = find_following_bns(model, torch.randn(1, 3, 8, 8), ["0"])
    assert pairs == {"1": "0"}  # named_modules lists the shared BN once
    swapped = swap_switchable_bns(model, pairs, K)
    assert model[1] is model.alias is swapped["0"]


def test_from_bn_refuses_a_bn_with_its_own_forward():
    class Shifted(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) + 1

    with pytest.raises(ValueError, match="own forward"):
        SwitchableBatchNorm2d.from_bn(Shifted(4), K)
    with pytest.raises(TypeError, match="BatchNorm2d"):
        SwitchableBatchNorm2d.from_bn(nn.BatchNorm1d(4), K)


def test_pinned_candidate_alone_computes_what_it_did_pinned():
    sbn = diverged(trained_bn()).eval()
    x = torch.randn(5, 4, 3, 3)
    with pytest.raises(RuntimeError, match="call pin"):
        sbn.keep_pinned_only()
    sbn.pin(2)
    before = sbn(x)
    exact(before, sbn.bns[2](x))
    sbn.keep_pinned_only()
    assert sbn.num_candidates == 1
    exact(sbn(x), before)
