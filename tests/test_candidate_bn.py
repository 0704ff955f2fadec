"""BatchNorm per candidate inside a DQ model: same start, exact fast paths, own statistics."""

import copy

import pytest
import torch

import instaquant as iq
from helpers import assert_models_match, dynamic_resnet20, seeded_train_step, varied_images
from instaquant.nn.switchable_bn import SwitchableBatchNorm2d


def _pair():
    """The same DQ ResNet-20 without and with per-candidate BatchNorm (identical weights)."""
    plain = dynamic_resnet20("pact")
    switch = dynamic_resnet20("pact", candidate_bn=True)
    switch.load_state_dict(_expand(plain.state_dict(), switch.state_dict()))
    return plain, switch


def _expand(shared: dict, target: dict) -> dict:
    """``shared``'s BatchNorm entries copied into every candidate's copy of ``target``."""
    out = {}
    for key in target:
        base = key.replace(".bns.0.", ".").replace(".bns.1.", ".").replace(".bns.2.", ".")
        out[key] = shared[base]
    return out


def test_every_bn_after_a_dynamic_conv_is_switchable():
    model = dynamic_resnet20("pact", candidate_bn=True)
    switchable = [n for n, m in model.model.named_modules() if isinstance(m, SwitchableBatchNorm2d)]
    # The convs of layer2 and layer3 are dynamic (after the tap layer1; the fc stays fp).
    assert len(switchable) == len(model.dynamic_layers) == 12
    assert all(n.startswith(("layer2", "layer3")) for n in switchable)
    assert not isinstance(model.model.layer1[0].bn1, SwitchableBatchNorm2d)


def test_a_fresh_model_computes_what_shared_bn_computes():
    plain, switch = _pair()
    x, y = varied_images(8), torch.arange(8)
    # Evaluation of a mixed batch: every copy holds the statistics the shared one does.
    plain.eval()
    switch.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), switch(x), atol=1e-12, rtol=1e-12)
    assert torch.unique(switch.last.bits_w, dim=0).shape[0] > 1
    # Training on one candidate: that copy sees the whole batch, as the shared BatchNorm does.
    plain.train()
    switch.train()
    L = len(plain.dynamic_layers)
    for b in (3, 5):
        with plain.forced_bits([b] * L), switch.forced_bits([b] * L):
            out_p, out_s = seeded_train_step(plain, x, y), seeded_train_step(switch, x, y)
        torch.testing.assert_close(out_p, out_s, atol=1e-12, rtol=1e-12)


def test_a_mixed_training_batch_normalizes_each_candidate_by_its_own_rows():
    plain, switch = _pair()
    x, y = varied_images(8), torch.arange(8)
    out_p, out_s = seeded_train_step(plain, x, y), seeded_train_step(switch, x, y)
    assert torch.unique(switch.last.bits_w[:, 0]).numel() > 1
    assert not torch.allclose(out_p, out_s)  # statistics of each candidate's rows alone


def test_candidates_keep_their_own_statistics():
    model = dynamic_resnet20("pact", candidate_bn=True)
    x, y = varied_images(8), torch.arange(8)
    seeded_train_step(model, x, y)
    chosen = set(model.last.bits_w[:, 0].tolist())  # layer2.0.conv1's choices
    bn = model.model.layer2[0].bn1
    moved = {k for k in range(3) if int(bn.bns[k].num_batches_tracked) > 0}
    assert moved == {int(b) - 3 for b in chosen} and len(moved) > 1


def test_training_step_matches_the_reference_mixture():
    fast = dynamic_resnet20("pact", candidate_bn=True)
    rec = assert_models_match(fast, copy.deepcopy(fast), varied_images(8), torch.arange(8))
    assert torch.unique(rec.bits_w, dim=0).shape[0] > 1


def test_routed_eval_matches_the_reference_mixture():
    fast = dynamic_resnet20("pact", candidate_bn=True)
    x, y = varied_images(9), torch.arange(9)
    seeded_train_step(fast, x, y)  # quantizers initialised, statistics per candidate moved
    ref = copy.deepcopy(fast)
    for layer in ref.dynamic_modules():
        layer.execution = "reference"
    fast.eval()
    ref.eval()
    with torch.no_grad():
        out_f, out_r = fast(x), ref(x)  # routed against the mixture (same BatchNorm path)
    torch.testing.assert_close(out_f, out_r, atol=1e-10, rtol=1e-10)
    assert torch.unique(fast.last.bits_w, dim=0).shape[0] > 1


def test_candidate_bn_refuses_separate_choices():
    with pytest.raises(ValueError, match="separate"):
        iq.DynamicSpec(bits=(2, 3, 4), candidate_bn=True, separate=True)
