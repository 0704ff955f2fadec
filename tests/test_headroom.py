"""Headroom: oracle, monotone oracle, front and captured share, by hand and on a real model."""

import pytest
import torch

import instaquant as iq
from helpers import dynamic_resnet20, varied_images
from instaquant.evaluation import evaluate
from instaquant.headroom import Headroom, measure_headroom
from instaquant.stats import spearman

T, F = True, False


def _hand_example(fp_loss=None):
    # Candidates 2/3/4 bits at 4/9/16 BitOPs per image; reference 9 (static 3-bit).
    right = torch.tensor([[T, T, T], [F, T, T], [T, F, T], [F, F, T], [T, T, F]])
    return Headroom(
        candidates=(2, 3, 4),
        ref_bitops=9.0,
        uniform_bitops=torch.tensor([4.0, 9.0, 16.0], dtype=torch.float64),
        right=right,
        controller_right=torch.tensor([T, T, F, T, T]),
        controller_bitops=torch.tensor([4.0, 9.0, 16.0, 16.0, 4.0], dtype=torch.float64),
        fp_loss=fp_loss,
    )


def test_oracles_and_shares_by_hand():
    s = _hand_example().summary()
    assert s["uniform_top1"] == pytest.approx([60.0, 60.0, 80.0], abs=1e-12)
    # Cheapest right: candidates 0, 1, 0, 2, 0 -> every image right at 4, 9, 4, 16, 4 BitOPs.
    assert s["oracle_top1"] == pytest.approx(100.0, abs=1e-12)
    assert s["oracle_bitops_rel"] == pytest.approx(37 / 5 / 9, abs=1e-12)
    assert s["oracle_share"] == pytest.approx({"2": 0.6, "3": 0.2, "4": 0.2, "none": 0.0})
    # Monotone: 0, 1, 2, 2, none (the last image is wrong at 4 bits) -> 80% at 49/5 BitOPs.
    assert s["monotone_oracle_top1"] == pytest.approx(80.0, abs=1e-12)
    assert s["monotone_oracle_bitops_rel"] == pytest.approx(49 / 5 / 9, abs=1e-12)
    assert s["monotone_oracle_share"] == pytest.approx({"2": 0.2, "3": 0.2, "4": 0.4, "none": 0.2})
    assert s["controller_top1"] == pytest.approx(80.0, abs=1e-12)
    assert s["controller_bitops_rel"] == pytest.approx(49 / 5 / 9, abs=1e-12)


def test_front_and_captured_share_by_hand():
    h = _hand_example()
    # The uniform points (4, 60), (9, 60), (16, 80) joined by lines, flat beyond the ends.
    assert h.front(2.0) == 60.0 and h.front(20.0) == 80.0
    assert h.front(12.5) == pytest.approx(70.0, abs=1e-12)
    s = h.summary()
    front_ctrl = 60 + 20 * (9.8 - 9) / 7
    assert s["controller_front_top1"] == pytest.approx(front_ctrl, abs=1e-12)
    # Oracle gain 100 - 60 at 7.4 BitOPs; the controller's 80 - front(9.8).
    assert s["captured_share"] == pytest.approx((80 - front_ctrl) / 40, abs=1e-12)
    # The monotone oracle sits where the controller does, with its accuracy: all of it.
    assert s["captured_share_monotone"] == pytest.approx(1.0, abs=1e-12)


def test_spread_and_correlations_by_hand():
    loss = torch.tensor([0.1, 0.5, 2.0, 1.0, 0.2], dtype=torch.float64)
    s = _hand_example(fp_loss=loss).summary()
    # Sorted per-image BitOPs 4, 4, 9, 16, 16: linear quantiles at 0.4 and 3.6 -> 4 and 16.
    assert s["bitops_p10_rel"] == pytest.approx(4 / 9) and s["bitops_p90_rel"] == pytest.approx(
        16 / 9
    )
    assert s["bitops_p90_over_p10"] == pytest.approx(4.0)
    bitops = torch.tensor([4.0, 9.0, 16.0, 16.0, 4.0])
    need = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0])
    assert s["rho_cheapest_right"] == pytest.approx(spearman(bitops, need), abs=1e-12)
    assert s["rho_fp_loss"] == pytest.approx(spearman(bitops, loss), abs=1e-12)
    assert _hand_example().summary()["rho_fp_loss"] is None


def test_ranked_allocations_by_hand():
    loss = torch.tensor([0.1, 0.5, 2.0, 1.0, 0.2], dtype=torch.float64)
    h = _hand_example(fp_loss=loss)
    # 9.8 BitOPs between 9 and 16: (9.8 - 9) / 7 of 5 images, rounded to 1, at 4 bits. By fp
    # loss the hardest is image 2 (right at 4 bits); the rest at 3 bits miss image 3.
    assert h.ranked(loss, 9.8, (1, 2)) == pytest.approx(80.0, abs=1e-12)
    # Outside the pair everything runs at its nearer end.
    assert h.ranked(loss, 4.0, (0, 1)) == pytest.approx(60.0)
    assert h.ranked(loss, 99.0, (1, 2)) == pytest.approx(80.0)
    # 6.5 BitOPs: half of the way from 4 to 9, so 2 (of 2.5) images at 3 bits, by fp loss
    # images 2 and 3: both wrong at 3 bits; the others at 2 bits are right but image 1.
    assert h.ranked(loss, 6.5, (0, 1)) == pytest.approx(40.0, abs=1e-12)
    # Pairs around 9.8: 2+4 bits (2 images at 4) and 3+4 bits (1 image); both give 80%, the
    # later pair wins the tie.
    ranked = h.summary()["ranked_top1"]
    assert ranked["fp_loss"] == {"top1": pytest.approx(80.0), "bits": [3, 4]}
    # Monotone starts 0, 1, 2, 2, none; "none" ranks easiest: images 2 and 3 go up.
    assert ranked["monotone_oracle"] == {"top1": pytest.approx(80.0), "bits": [3, 4]}
    assert "cheapest_confidence" not in ranked  # not measured in this hand example
    # Image 4 least sure at 2 bits, then (ties in image order) image 3: at 2+4 bits they go
    # to 4 bits (4 wrong, 3 right), images 0 and 2 right at 2 bits: 60%; at 3+4 bits 40%.
    h.confidence = torch.tensor([[0.9, 0.5, 0.5]] * 4 + [[0.1, 0.5, 0.5]], dtype=torch.float64)
    assert h.summary()["ranked_top1"]["cheapest_confidence"] == {
        "top1": pytest.approx(60.0),
        "bits": [2, 4],
    }


def test_no_oracle_gain_gives_no_captured_share():
    h = _hand_example()
    h.right = torch.ones(5, 3, dtype=torch.bool)  # every candidate right on every image
    s = h.summary()
    assert s["oracle_top1"] == 100.0 and s["oracle_bitops_rel"] == pytest.approx(4 / 9)
    assert s["captured_share"] is None  # the oracle is on the front: nothing to capture


def test_measure_headroom_matches_forced_evaluations():
    model = dynamic_resnet20()
    x = varied_images(24)
    y = torch.randint(0, 10, (24,), generator=torch.Generator().manual_seed(3))
    loader = [(x[:10], y[:10]), (x[10:], y[10:])]
    fp = iq.models.resnet20(num_classes=10).double()
    model.train()
    room = measure_headroom(model, loader, ref_bits=4, fp_model=fp)
    assert model.training and fp.training  # modes restored
    assert room.right.shape == (24, 3) and room.n == 24
    ctrl = evaluate(model, loader, 4, per_sample=True).per_sample
    torch.testing.assert_close(room.controller_right, ctrl["pred"] == ctrl["label"])
    torch.testing.assert_close(room.controller_bitops, ctrl["bitops"].double())
    assert len(set(room.controller_bitops.tolist())) > 1  # the controller splits this batch
    L = len(model.dynamic_layers)
    for k, b in enumerate((3, 4, 5)):
        with model.forced_bits([b] * L):
            forced = evaluate(model, loader, 4, per_sample=True).per_sample
        torch.testing.assert_close(room.right[:, k], forced["pred"] == forced["label"])
        # Every dynamic layer at b bits: the static b-bit BitOPs of the same layers.
        static_part = float(model.static_part_bitops)
        dynamic_part = float((model.dynamic_macs * b * b).sum())
        assert float(room.uniform_bitops[k]) == static_part + dynamic_part
    assert room.ref_bitops == model.static_bitops(4)
    fp_ps = evaluate(fp, loader, 4, per_sample=True).per_sample
    torch.testing.assert_close(room.fp_loss, fp_ps["loss"].double())
    with model.forced_bits([3] * L), torch.no_grad():
        model.eval()
        top = torch.cat([model(xb).softmax(1).amax(1) for xb, _ in loader]).double()
    torch.testing.assert_close(room.confidence[:, 0], top)
    assert set(room.summary()["ranked_top1"]) == {
        "monotone_oracle",
        "fp_loss",
        "cheapest_confidence",
    }
    # The layer policy: every image at each layer's most frequent choice of the controller.
    shares = torch.tensor(evaluate(model, loader, 4).metrics["candidate_fraction"])
    majority = [(3, 4, 5)[int(k)] for k in shares.argmax(1)]
    assert room.policy_bits == [majority, majority]
    with model.forced_bits(majority):
        policy = evaluate(model, loader, 4, per_sample=True).per_sample
    torch.testing.assert_close(room.policy_right, policy["pred"] == policy["label"])
    s = room.summary()
    assert s["layer_policy_top1"] == pytest.approx(100 * float(room.policy_right.double().mean()))
    assert s["layer_policy_bitops_rel"] == pytest.approx(
        float(policy["bitops"][0]) / room.ref_bitops
    )
    assert s["layer_policy_front_top1"] == pytest.approx(room.front(float(policy["bitops"][0])))


def test_measure_headroom_refuses_a_static_model():
    qs = iq.static(iq.models.resnet20(), "pact", 4, torch.randn(1, 3, 16, 16))
    with pytest.raises(TypeError, match="DynamicQuantModel"):
        measure_headroom(qs, [], 4)


def test_line_at_is_piecewise_linear_and_flat_beyond_its_ends():
    from instaquant.stats import line_at

    points = [(4.0, 80.0), (1.0, 60.0), (2.0, 70.0)]  # any order
    assert line_at(points, 0.5) == 60.0 and line_at(points, 9.0) == 80.0
    assert line_at(points, 1.5) == 65.0 and line_at(points, 3.0) == 75.0
    assert line_at(points, 2.0) == 70.0


def test_cascade_by_hand():
    # Confidence at the cheapest candidate: image 3 least sure, then 1, 2, 0, 4.
    conf = torch.tensor(
        [[0.9, 0.5, 0.5], [0.6, 0.5, 0.5], [0.7, 0.5, 0.5], [0.3, 0.5, 0.5], [0.95, 0.5, 0.5]]
    )
    h = _hand_example()
    h.confidence, h.shared_bitops = conf.double(), 1.0
    # 4 + share * (16 - 1) = 7 -> a fifth again at 4 bits: image 3, right there; the rest
    # keep their 2-bit answers (images 0, 2, 4 right): 80%.
    assert h.cascade(7.0, (0, 2)) == (pytest.approx(80.0, abs=1e-12), pytest.approx(0.2))
    # 4 + share * 15 = 10 -> two fifths (images 3 and 1) again: image 1 is right at 4 bits too.
    assert h.cascade(10.0, (0, 2))[0] == pytest.approx(100.0, abs=1e-12)
    # Below the first pass nothing runs again; the share never exceeds one.
    assert h.cascade(2.0, (0, 2)) == (pytest.approx(60.0), 0.0)
    assert h.cascade(100.0, (0, 2)) == (pytest.approx(80.0), 1.0)
    # The best pair at 7 BitOPs: 0 -> 2 (80%, exactly 7 BitOPs) against 0 -> 1 (4 + share * 8:
    # 3/8 of five is 1.875 images, rounded down to one, image 3, wrong at 3 bits too: 60%).
    # Rounded up, two images would cost 4 + 0.4 * 8 = 7.2, above the level.
    assert h.cascade(7.0, (0, 1)) == (pytest.approx(60.0), pytest.approx(0.2))
    best = h.best_cascade(7.0)
    assert best["bits"] == [2, 4] and best["top1"] == pytest.approx(80.0)
    assert best["again"] == pytest.approx(0.2) and best["bitops_rel"] == pytest.approx(7.0 / 9)
    assert h.best_cascade(3.0) == {}  # the cheapest candidate alone costs more
    assert (
        h.summary()["cascade"]["bits"] == h.best_cascade(float(h.controller_bitops.mean()))["bits"]
    )
    h.confidence = None
    assert h.summary()["cascade"] == {}
    with pytest.raises(ValueError, match="confidence"):
        h.cascade(7.0, (0, 2))


def test_a_cascade_shares_only_the_static_layers_before_the_tap():
    model = dynamic_resnet20().eval()
    x, L = varied_images(4), len(model.dynamic_layers)
    taps = []
    model.model.get_submodule(model.spec.tap).register_forward_hook(lambda m, i, o: taps.append(o))
    for b in model.spec.bits:  # what a second pass would reuse is the same at every candidate
        with torch.no_grad(), model.forced_bits([b] * L):
            model(x)
    assert all(torch.equal(taps[0], t) for t in taps[1:])
    room = measure_headroom(model, [(x, torch.arange(4))], ref_bits=4)
    before = [i for i in model.layers if i.before_tap and i.role == "static"]
    shared = sum(i.bitops_at(i.bits[0]) for i in before)
    assert before and room.shared_bitops == pytest.approx(shared)
    assert 0 < room.shared_bitops < float(room.uniform_bitops[0])
