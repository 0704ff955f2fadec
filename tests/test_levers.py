"""The options that aim to make per-image bits pay: controller input, random-choice warm-up,
distillation (each checked on its own)."""

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import instaquant as iq
from helpers import dynamic_resnet20, seeded_train_step, varied_images
from instaquant import config as C
from instaquant.builder import epoch_progress
from instaquant.checkpoint import CheckpointError
from instaquant.controller import BitController
from instaquant.cost import controller_cost
from instaquant.engine import (
    _running_stats_kept,
    controller_only_lr_factor,
    fit,
    lr_factor,
    train_model,
)

TINY = ["data.name=digits", "data.limit=128", "data.batch_size=32", "model.name=digits_net"]


# --------------------------------------------------------------------------- controller input


def test_grid_and_statistics_features_by_hand():
    tap = torch.arange(2 * 3 * 4 * 4, dtype=torch.float64).reshape(2, 3, 4, 4)
    tap[1] = tap[1] ** 2 / 10  # a second image with other statistics
    ctrl = BitController(3, num_layers=2, num_candidates=3, grid=2, stats=True).double()
    f = ctrl.features(tap)
    assert f.shape == (2, 3 * 2 * 2 + 2 * 3)
    cells = tap.reshape(2, 3, 2, 2, 2, 2).mean(dim=(3, 5))  # 2x2 cells of 2x2 positions
    torch.testing.assert_close(f[:, :12], cells.reshape(2, 12), atol=1e-12, rtol=0)
    flat = tap.flatten(2)
    std = ((flat - flat.mean(2, keepdim=True)) ** 2).mean(2).sqrt()
    torch.testing.assert_close(f[:, 12:15], std, atol=1e-12, rtol=0)
    # First image: horizontal neighbours differ by 1, vertical by 4, everywhere.
    torch.testing.assert_close(f[0, 15:], torch.full((3,), 5.0, dtype=torch.float64))
    assert ctrl(tap).shape == (2, 2, 3)


def test_grid_controller_runs_at_any_resolution_and_counts_its_cost():
    fp = iq.models.resnet20()
    spec = iq.DynamicSpec(bits=(2, 3, 4), controller_grid=4, controller_stats=True)
    model = iq.dynamic(fp, spec, example_input=torch.randn(1, 3, 32, 32))
    assert model.controller.fc1.in_features == 16 * 16 + 2 * 16
    model.eval()
    with torch.no_grad(), pytest.warns(UserWarning, match="shape"):
        assert model(torch.randn(2, 3, 48, 48)).shape == (2, 10)
    macs, _ = controller_cost(model.controller, model.tap_shape)
    fc = sum(
        m.in_features * m.out_features
        for m in model.controller.modules()
        if isinstance(m, torch.nn.Linear)
    )
    assert macs == 16 * 32 * 32 * 5 + fc  # pooling 1 add and two statistics 2 each per element


@pytest.mark.parametrize("grid", [0, 1.5, True])
def test_bad_grid_is_refused(grid):
    with pytest.raises(ValueError, match="controller_grid"):
        iq.DynamicSpec(controller_grid=grid)


# --------------------------------------------------------------------------- random warm-up


def test_random_choices_vary_and_leave_the_controller_without_gradient():
    model = dynamic_resnet20("pact", bias=torch.tensor([0.0, 40.0, 0.0], dtype=torch.float64))
    x, y = varied_images(16), torch.arange(16) % 10
    model.set_random_choices(True)
    seeded_train_step(model, x, y)
    sel = model.last.selection
    assert ((sel == 0) | (sel == 1)).all() and (sel.sum(-1) == 1).all()
    # The controller alone would put everything at 4 bits; random choices use all three.
    assert set(model.last.bits_w.flatten().tolist()) == {3.0, 4.0, 5.0}
    assert all(p.grad is None for p in model.controller.parameters())
    assert model.model.layer3[0].conv1.weight.grad is not None
    model.eval()  # evaluation keeps the controller's choices
    with torch.no_grad():
        model(x)
    assert (model.last.bits_w == 4).all()
    model.train()
    model.set_random_choices(False)
    seeded_train_step(model, x, y)
    assert (model.last.bits_w == 4).all()


def test_temperature_anneals_over_the_epochs_after_the_warm_up():
    cfg = C.from_dict({}, ["epochs=5", "quant.random_epochs=2"])
    assert [epoch_progress(cfg, e) for e in range(5)] == [0, 0, 0, 0.5, 1]
    spec = iq.DynamicSpec(bits=(2, 3, 4), tau=1.0, tau_final=0.1)
    model = iq.dynamic(iq.models.resnet20(), spec, torch.randn(1, 3, 16, 16))
    taus = []
    for e in range(5):
        model.set_progress(epoch_progress(cfg, e))
        taus.append(model.tau)
    assert taus[:3] == [1.0, 1.0, 1.0] and taus[4] == pytest.approx(0.1)
    assert taus[3] == pytest.approx(math.sqrt(0.1))  # exponential: halfway in log space
    fixed = iq.dynamic(iq.models.resnet20(), iq.DynamicSpec(tau=0.7), torch.randn(1, 3, 16, 16))
    fixed.set_progress(1.0)
    assert fixed.tau == 0.7  # no tau_final: nothing to anneal


def test_warm_up_run_trains_and_measures(tmp_path):
    cfg = C.from_dict(
        {"name": "warm", "out": str(tmp_path / "warm")},
        [*TINY, "epochs=2", "quant.bits=[2,3,4]", "quant.random_epochs=1"],
    )
    entry = fit(cfg, progress=False)
    assert entry["headroom"]["controller_top1"] == pytest.approx(entry["top1"])


def test_controller_only_epochs_follow_the_warm_up_and_leave_one_for_the_network():
    C.from_dict({}, ["epochs=3", "quant.controller_epochs=2"])
    C.from_dict({}, ["epochs=3", "quant.random_epochs=1", "quant.controller_epochs=2"])
    with pytest.raises(C.ConfigError, match=r"controller_epochs': 2 must be in 0\.\.1"):
        C.from_dict({}, ["epochs=3", "quant.random_epochs=2", "quant.controller_epochs=2"])
    with pytest.raises(C.ConfigError, match="controller_epochs"):
        C.from_dict(
            {}, ["epochs=3", "recipe=static", "quant.bits=[4]", "quant.controller_epochs=1"]
        )


def test_the_controller_only_learning_rate_is_a_cosine_of_its_own():
    cfg = C.from_dict({}, ["epochs=6", "quant.controller_epochs=2"])
    factors = [controller_only_lr_factor(cfg, t) for t in (4.0, 5.0, 6.0)]
    assert factors == pytest.approx([1.0, 0.5, 0.0])


def test_the_network_finishes_its_schedule_before_the_controller_only_epochs():
    """7 epochs with one controller-only epoch: the network's rate and the Gumbel temperature
    are those of a 6-epoch run, so the run's first 6 epochs are that run's."""
    for schedule in ("cosine", "onecycle", "multistep"):
        staged = C.from_dict(
            {}, ["epochs=7", "quant.controller_epochs=1", f"optim.schedule={schedule}"]
        )
        plain = C.from_dict({}, ["epochs=6", f"optim.schedule={schedule}"])
        for t in (0.0, 1.5, 3.0, 5.5, 6.0):
            assert lr_factor(staged, t) == lr_factor(plain, t)
        assert [epoch_progress(staged, e) for e in range(6)] == [
            epoch_progress(plain, e) for e in range(6)
        ]
        assert epoch_progress(staged, 6) == 1.0
    cosine = C.from_dict({}, ["epochs=7", "quant.controller_epochs=1"])
    assert lr_factor(cosine, 3.0) == pytest.approx(0.5) and lr_factor(cosine, 6.0) < 1e-12


def test_controller_only_epochs_train_the_controller_and_nothing_else(tmp_path):
    """The network's parameters and buffers (BatchNorm statistics per candidate, clips) end
    the controller-only epoch exactly as the epoch before left them; the controller moves."""
    cfg = C.from_dict(
        {"name": "settle", "out": str(tmp_path / "settle")},
        [
            *TINY,
            "epochs=2",
            "quant.bits=[2,3,4]",
            "budget.target_bits=3",
            "quant.controller_epochs=1",
        ]
        + ["quant.candidate_bn=true", "distill.teacher=highest", "optim.lr=0.05"],
    )
    fit(cfg, progress=False, stop_after_epoch=1)
    before = torch.load(tmp_path / "settle" / "last.pt", weights_only=False)["model"]
    entry, model = train_model(cfg, resume=True, progress=False)
    after = model.state_dict()
    network = [k for k in before if not k.startswith("controller.")]
    moved = [k for k in network if not torch.equal(before[k], after[k])]
    assert network and moved == []
    controller = [k for k in before if k.startswith("controller.") and "weight" in k]
    assert any(not torch.equal(before[k], after[k]) for k in controller)
    rows = [json.loads(line) for line in (tmp_path / "settle" / "metrics.jsonl").open()]
    assert [r["controller_only"] for r in rows] == [False, True]
    assert rows[1]["lr"] > 0 and "headroom" in entry


def test_a_budget_that_never_binds_warns_once_with_its_numbers():
    with pytest.warns(UserWarning, match="never binds") as seen:
        iq.dynamic(iq.models.resnet20(), iq.DynamicSpec(bits=(2, 3, 4)), torch.randn(1, 3, 16, 16))
    assert len(seen) == 1 and "every dynamic layer at 4 bits" in str(seen[0].message)
    bits = iq.DynamicSpec(bits=(2, 3, 4), budget=iq.Budget(kind="bits", target_bits=4))
    with pytest.warns(UserWarning, match="never binds"):
        iq.dynamic(iq.models.resnet20(), bits, torch.randn(1, 3, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one below the top: no warning
        iq.dynamic(iq.models.resnet20(), iq.DynamicSpec(bits=(3, 4, 5)), torch.randn(1, 3, 16, 16))


def test_evaluation_with_autograd_on_warns_once():
    model = iq.dynamic(iq.models.resnet20(), iq.DynamicSpec(), torch.randn(1, 3, 16, 16)).eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(UserWarning, match="torch.no_grad") as seen:
        model(x)
        model(x)
    assert len([w for w in seen if "no_grad" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(x)  # routed: nothing to say
        model.requires_grad_(False)
        model(x)  # nothing can want a gradient: the layers route
        model.train()
        model(x)  # training computes the branches it needs


def test_the_core_imports_no_config_layer():
    code = (
        "import sys, instaquant; "
        "assert 'instaquant.config' not in sys.modules and 'yaml' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith('instaquant'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "override, message",
    [
        ("quant.random_epochs=3", "random_epochs"),
        ("quant.controller_epochs=3", "controller_epochs"),
        ("quant.controller_epochs=-1", "controller_epochs"),
        ("distill.teacher=fp", "model.init"),
        ("distill.teacher=teacher", "distill.teacher"),
        ("distill.teacher=checkpoint", "distill.checkpoint"),
        ("distill.checkpoint=runs/x", "distill.checkpoint"),
        ("distill.temperature=0", "distill.temperature"),
    ],
)
def test_bad_lever_settings_are_one_line_errors(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.from_dict({}, ["epochs=3", "distill.teacher=highest", override])


# --------------------------------------------------------------------------- distillation


def test_distillation_loss_closed_form_and_gradient():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    T = 2.0
    p, q = F.softmax(s / T, 1), F.softmax(t / T, 1)
    expected = T**2 * (q * (q.log() - p.log())).sum(1).mean()
    loss = iq.distillation_loss(s, t, T)
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=0)
    loss.backward()
    assert t.grad is None and s.grad.abs().sum() > 0  # only the student learns
    same = iq.distillation_loss(t.detach(), t.detach(), T)
    assert float(same) == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp")
    fit(
        C.from_dict({"name": "fp", "out": str(tmp / "fp")}, [*TINY, "recipe=fp", "epochs=1"]),
        progress=False,
    )
    return tmp / "fp"


@pytest.mark.parametrize("teacher", ["fp", "highest"])
def test_distillation_runs_change_training(tmp_path, fp_run, teacher):
    def run(name, *extra):
        cfg = C.from_dict(
            {"name": name, "out": str(tmp_path / name)},
            [*TINY, "epochs=1", "quant.bits=[2,3,4]", f"model.init={fp_run}", *extra],
        )
        return fit(cfg, progress=False)

    plain = run("plain")
    taught = run(teacher, f"distill.teacher={teacher}", "distill.weight=2.0")
    assert taught["top1"] != plain["top1"] or taught["bitops_rel"] != plain["bitops_rel"]


def test_a_checkpoint_teacher_teaches_as_the_same_network_from_model_init(tmp_path, fp_run):
    """``distill.teacher=checkpoint`` loads any trained run as the frozen teacher: given the
    full-precision start itself, it trains exactly as ``distill.teacher=fp``."""

    def run(name, *extra):
        cfg = C.from_dict(
            {"name": name, "out": str(tmp_path / name)},
            [*TINY, "epochs=1", "recipe=static", "quant.bits=[3]", f"model.init={fp_run}"]
            + ["distill.weight=2.0", *extra],
        )
        fit(cfg, progress=False)
        return torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]

    by_init = run("fp", "distill.teacher=fp")
    by_checkpoint = run("ckpt", "distill.teacher=checkpoint", f"distill.checkpoint={fp_run}")
    assert by_init.keys() == by_checkpoint.keys()
    for key, value in by_init.items():
        assert torch.equal(value, by_checkpoint[key]), key


def test_a_checkpoint_teacher_of_other_data_is_refused(tmp_path, fp_run):
    cfg = C.from_dict(
        {"name": "s", "out": str(tmp_path / "s")},
        [*TINY, "epochs=1", "recipe=static", "quant.bits=[3]", f"model.init={fp_run}"]
        + ["distill.teacher=checkpoint", f"distill.checkpoint={fp_run}", "data.name=digits_noise"],
    )
    with pytest.raises(CheckpointError, match="trained on"):
        fit(cfg, progress=False)


# --------------------------------------------------------------------------- ranking


def test_rank_loss_closed_form_and_gradient():
    cost = torch.tensor([3.0, 1.0, 2.0, 5.0], dtype=torch.float64, requires_grad=True)
    gain = torch.tensor([0.1, -2.0, 7.0, 9.0], dtype=torch.float64)
    ranks = torch.tensor([1.0, 0.0, 2.0, 3.0], dtype=torch.float64)  # of the gain
    c, r = cost.detach() - cost.detach().mean(), ranks - ranks.mean()
    pearson = (c * r).sum() / ((c * c).sum() * (r * r).sum()).sqrt()
    loss = iq.rank_loss(cost, gain)
    torch.testing.assert_close(loss, 1 - pearson, atol=1e-12, rtol=0)
    loss.backward()
    assert cost.grad[2] < 0  # the image ranked third by gain but second-cheapest should rise
    ordered = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert float(iq.rank_loss(ordered, ordered * 100)) == pytest.approx(0.0, abs=1e-12)
    assert float(iq.rank_loss(ordered, -ordered)) == pytest.approx(2.0, abs=1e-12)
    flat = torch.ones(4, dtype=torch.float64, requires_grad=True)  # no spread: nothing to rank
    zero = iq.rank_loss(flat, gain)
    zero.backward()
    assert float(zero) == 0.0 and float(flat.grad.abs().sum()) == 0.0
    with pytest.raises(ValueError, match=r"\[B\]"):
        iq.rank_loss(cost.detach(), gain[:3])


def test_expected_bitops_matches_the_choice_when_certain_and_the_mean_when_uniform():
    model = dynamic_resnet20(bias=torch.tensor([0.0, 0.0, 60.0], dtype=torch.float64)).train()
    x = varied_images(3)
    model(x)
    torch.testing.assert_close(model.expected_bitops(), model.last.bitops, atol=1e-6, rtol=1e-12)
    model.controller.fc2.bias.data.zero_()  # every candidate equally likely
    model(x)
    b = model.candidate_bits.double()
    macs = model.dynamic_macs.double()
    uniform = (macs * (b * b).mean()).sum() + model.static_part_bitops.double()
    torch.testing.assert_close(model.expected_bitops(), uniform.expand(3), atol=1e-6, rtol=0)
    model.expected_bitops().sum().backward()
    assert model.controller.fc2.bias.grad.abs().sum() > 0  # smooth in the logits
    with model.forced_bits([4] * len(model.dynamic_layers)):
        model(x)
    assert model.expected_bitops() is None  # no controller ran


def test_ranking_run_reports_its_correlation_and_changes_training(tmp_path):
    def run(weight):
        cfg = C.from_dict(
            {"name": f"rank{weight}", "out": str(tmp_path / f"r{weight}")},
            [*TINY, "epochs=2", "quant.bits=[2,3,4]", "quant.random_epochs=1"]
            + [f"budget.rank_weight={weight}"],
        )
        entry = fit(cfg, progress=False)
        rows = (tmp_path / f"r{weight}" / "metrics.jsonl").read_text().splitlines()
        return entry, [json.loads(r) for r in rows]

    plain, ranked = run(0.0), run(2.0)
    assert all("train_rank_corr" not in r for r in plain[1])
    warm, joint = ranked[1]
    assert "train_rank_corr" not in warm  # random choices: no controller to rank
    assert -1.0 <= joint["train_rank_corr"] <= 1.0
    assert (plain[0]["top1"], plain[0]["bitops_rel"]) != (
        ranked[0]["top1"],
        ranked[0]["bitops_rel"],
    )


def test_ranking_reuses_the_highest_candidates_forward_of_distillation(tmp_path):
    cfg = C.from_dict(
        {"name": "rank_taught", "out": str(tmp_path / "rt")},
        [*TINY, "epochs=1", "quant.bits=[2,3,4]", "quant.candidate_bn=true"]
        + ["distill.teacher=highest", "budget.rank_weight=1.0"],
    )
    fit(cfg, progress=False)
    row = json.loads((tmp_path / "rt" / "metrics.jsonl").read_text().splitlines()[-1])
    assert -1.0 <= row["train_rank_corr"] <= 1.0


def test_measuring_forwards_leave_batchnorm_statistics_alone():
    model = dynamic_resnet20(candidate_bn=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    with torch.no_grad(), _running_stats_kept(model):
        with model.forced_bits([3] * len(model.dynamic_layers)):
            model(varied_images(4))
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    with torch.no_grad():
        model(varied_images(4))  # an ordinary training forward does update them
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("override", ["budget.rank_weight=-1", "recipe=static"])
def test_bad_rank_weight_is_a_one_line_error(override):
    with pytest.raises(C.ConfigError, match="rank_weight"):
        C.from_dict({}, ["budget.rank_weight=1", "quant.bits=[4]", override])
