"""The CIFAR-10 reproduction's run plan: every run is a valid config, with the settings the docs state."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from instaquant import config

REPO = Path(__file__).resolve().parent.parent


def _script(name: str = "reproduce_cifar10"):
    """A benchmark script under benchmarks/, loaded as a module."""
    path = REPO / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_plan_and_ablations_are_valid_configs(tmp_path):
    script = _script()
    runs = script.plan(tmp_path / "data", tmp_path / "out", "quick", ["dorefa", "pact"], None)
    cfgs = {raw["name"]: config.from_dict(raw) for raw in runs}
    assert list(cfgs)[0] == "fp"
    for method in ("dorefa", "pact"):
        for bits in (3, 4, 5):
            static = cfgs[f"{method}_static{bits}"]
            assert static.recipe == "static" and list(static.quant.bits) == [bits]
            assert static.epochs == script.SCHEDULES["quick"]["qat"]["epochs"]
        for budget in (4, 3):
            dq = cfgs[f"{method}_dq_budget{budget}"]
            assert list(dq.quant.bits) == [budget - 1, budget, budget + 1]
            assert dq.budget.target_bits == budget and dq.epochs == static.epochs

    extra = {
        raw["name"]: config.from_dict(raw) for raw in script.ablation_plan(runs, tmp_path, "quick")
    }
    base = cfgs["pact_dq_budget4"]
    shared = extra["pact_dq_budget4_shared"]
    assert shared.quant.share and not base.quant.share
    assert list(shared.quant.bits) == list(base.quant.bits) and shared.epochs == base.epochs
    assert extra["pact_static4_qat2x"].epochs == 2 * cfgs["pact_static4"].epochs
    assert extra["pact_dq_budget4_qat2x"].epochs == 2 * base.epochs
    assert len({c.out for c in (*cfgs.values(), *extra.values())}) == len(cfgs) + len(extra)


def _config_diff(cfg: dict, base: dict) -> set[tuple[str, str]]:
    """``(section, key)`` of every value two resolved configs differ in (top-level keys as
    section ``run``), their names and output folders aside."""
    diff = {
        (section, key)
        for section, values in cfg.items()
        if isinstance(values, dict)
        for key in values
        if values[key] != base[section][key]
    }
    return diff | {
        ("run", key)
        for key, value in cfg.items()
        if key not in ("name", "out") and not isinstance(value, dict) and value != base[key]
    }


def test_learn_plan_starts_from_the_given_model_and_levers_change_one_thing(tmp_path):
    script = _script()
    fp = tmp_path / "fp.pt"
    runs = script.plan(tmp_path / "data", tmp_path / "out", "learn", ["pact"], None, fp)
    cfgs = {raw["name"]: config.from_dict(raw) for raw in runs}
    assert "fp" not in cfgs and all(c.model.init == str(fp) for c in cfgs.values())
    # The comparisons the targets need first, the ends of the static line last.
    assert list(cfgs) == [
        "pact_static3",
        "pact_static4",
        "pact_dq_budget3",
        "pact_dq_budget4",
        "pact_static2",
        "pact_static5",
    ]
    assert {c.epochs for c in cfgs.values()} == {script.SCHEDULES["learn"]["qat"]["epochs"]}
    with pytest.raises(SystemExit, match="fp-init"):
        script.plan(tmp_path / "data", tmp_path / "out", "learn", ["pact"], None)

    names = [*sorted(script.LEVERS), "candidate_bn+distill_highest"]
    levers = script.lever_plan(runs, tmp_path / "out", names)
    base = config.from_dict(next(r for r in runs if r["name"] == "pact_dq_budget3")).to_dict()
    for raw in levers:
        changed = config.from_dict(raw).to_dict()
        diff = _config_diff(changed, base)
        parts = raw["name"].removeprefix("pact_dq_budget3_").split("+")
        expected = {(s, k) for p in parts for s, kv in script.LEVERS[p].items() for k in kv}
        if "controller1" in parts:  # its controller-only epoch follows the schedule's six
            expected.add(("run", "epochs"))
            assert changed["epochs"] == base["epochs"] + 1
        assert diff == expected, parts
    with pytest.raises(argparse.ArgumentTypeError, match="unknown lever 'bogus'.*allowed: "):
        script.lever_name("candidate_bn+bogus")


def test_static_seed_plan_changes_only_the_seed(tmp_path):
    script = _script()
    runs = script.plan(
        tmp_path / "data", tmp_path / "out", "learn", ["pact"], None, tmp_path / "fp.pt"
    )
    seeded = script.static_seed_plan(runs, tmp_path / "out", [1, 2])
    assert [r["name"] for r in seeded] == [
        "pact_static3_seed1",
        "pact_static4_seed1",
        "pact_static3_seed2",
        "pact_static4_seed2",
    ]
    by_name = {r["name"]: config.from_dict(r).to_dict() for r in runs}
    for raw in seeded:
        cfg = config.from_dict(raw).to_dict()
        base = by_name[raw["name"].rsplit("_", 1)[0]]
        diff = {k for k in cfg if k not in ("name", "out") and cfg[k] != base[k]}
        assert diff == {"seed"} and cfg["seed"] == int(raw["name"][-1])
        assert cfg["out"] == str(tmp_path / "out" / raw["name"])


def test_levers_and_seeds_of_another_method_differ_from_pacts_only_in_the_method(tmp_path):
    script = _script()
    runs = script.plan(
        tmp_path / "data", tmp_path / "out", "learn", ["pact", "lsq"], None, tmp_path / "fp.pt"
    )
    pairs = [
        (
            script.lever_plan(runs, tmp_path / "out", ["candidate_bn+stats"], m)[0]
            for m in ("pact", "lsq")
        ),
        (script.static_seed_plan(runs, tmp_path / "out", [1], m)[1] for m in ("pact", "lsq")),
    ]
    for pact, lsq in pairs:
        assert lsq["name"] == pact["name"].replace("pact_", "lsq_", 1)
        pact_cfg, lsq_cfg = (config.from_dict(r).to_dict() for r in (pact, lsq))
        assert lsq_cfg["quant"] == {**pact_cfg["quant"], "method": "lsq"}
        assert {k: v for k, v in lsq_cfg.items() if k not in ("name", "out", "quant")} == {
            k: v for k, v in pact_cfg.items() if k not in ("name", "out", "quant")
        }


def test_only_trains_the_named_runs_and_refuses_unknown_names_first(tmp_path, monkeypatch, capsys):
    script = _script()
    trained = []
    monkeypatch.setattr(script, "fit", lambda cfg, **k: trained.append(cfg.name))
    monkeypatch.setattr(script, "extract", lambda *a: pytest.fail("extracted before checking"))
    argv = ["reproduce_cifar10.py", "--learn", "--fp-init", str(tmp_path / "fp.pt")]
    argv += ["--out", str(tmp_path / "out"), "--methods", "lsq"]
    monkeypatch.setattr("sys.argv", [*argv, "--levers", "stats", "--only", "lsq_bogus"])
    with pytest.raises(SystemExit) as stop:
        script.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--only names no planned run: lsq_bogus" in err
    assert "lsq_dq_budget3_stats" in err and trained == []

    argv += ["--root", str(tmp_path)]

    def fit(cfg, **kw):  # a finished run: its summary, as engine.fit writes it
        trained.append(cfg.name)
        entry = {"name": cfg.name, "recipe": cfg.recipe, "method": "lsq", "bits": [3]}
        entry.update(top1=80.0, bitops_rel=0.5625, mean_bits=3.0)
        Path(cfg.out).mkdir(parents=True)
        (Path(cfg.out) / "summary.json").write_text(json.dumps({"runs": [entry]}))

    monkeypatch.setattr(script, "fit", fit)
    fp = {"name": "fp", "recipe": "fp", "method": None, "bits": None, "top1": 85.0}
    monkeypatch.setattr(script, "fp_entry", lambda path: {**fp, "bitops_rel": None})
    only = ["lsq_dq_budget3_stats", "lsq_static3"]
    monkeypatch.setattr("sys.argv", [*argv, "--levers", "stats", "--only", *only])
    script.main()
    assert trained == ["lsq_static3", "lsq_dq_budget3_stats"]
    tables = (tmp_path / "out" / "levers.md").read_text()
    assert "lsq_static3" in tables and "lsq_dq_budget3_stats" in tables
    assert "lsq_static4" not in (tmp_path / "out" / "results.md").read_text()

    # Ablation runs follow --only too, and their table leaves out the runs not trained.
    trained.clear()
    argv = [*argv[:4], "--root", str(tmp_path), "--out", str(tmp_path / "ablations")]
    monkeypatch.setattr("sys.argv", [*argv, "--ablations", "--only", "pact_static4_qat2x"])
    script.main()
    assert trained == ["pact_static4_qat2x"]
    assert "pact_static4_qat2x" in (tmp_path / "ablations" / "ablations.md").read_text()


def test_weights4_static_plan_changes_only_the_activation_bits(tmp_path):
    script = _script()
    runs = script.plan(
        tmp_path / "data", tmp_path / "out", "learn", ["pact"], None, tmp_path / "fp.pt"
    )
    fixed = script.weights4_static_plan(runs, tmp_path / "out", [0, 1])
    assert [r["name"] for r in fixed] == [
        "pact_static2_w4",
        "pact_static3_w4",
        "pact_static2_w4_seed1",
        "pact_static3_w4_seed1",
    ]
    base = config.from_dict(next(r for r in runs if r["name"] == "pact_static4")).to_dict()
    for raw, bits, seed in zip(fixed, (2, 3, 2, 3), (0, 0, 1, 1), strict=True):
        cfg = config.from_dict(raw).to_dict()
        expected = {("quant", "bits"), ("quant", "weight_bits")} | (
            {("run", "seed")} if seed else set()
        )
        assert _config_diff(cfg, base) == expected
        assert cfg["quant"]["bits"] == [bits] and cfg["quant"]["weight_bits"] == 4
        assert cfg["seed"] == seed and cfg["out"] == str(tmp_path / "out" / raw["name"])


def test_ablations_without_pact_stop_before_any_training(tmp_path, monkeypatch, capsys):
    script = _script()
    monkeypatch.setattr(script, "run_all", lambda *a: pytest.fail("trained before checking"))
    argv = ["reproduce_cifar10.py", "--quick", "--ablations", "--methods", "dorefa"]
    monkeypatch.setattr("sys.argv", [*argv, "--root", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        script.main()
    assert stop.value.code == 2 and "include pact in --methods" in capsys.readouterr().err


def _ratio_over_time(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # it imports speed.py beside it
    path = REPO / "benchmarks" / "ratio_over_time.py"
    spec = importlib.util.spec_from_file_location("ratio_over_time", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "ratio_over_time", module)  # its dataclass looks it up
    spec.loader.exec_module(module)
    return module


def test_ratio_over_time_summary_splits_rounds_at_the_target(monkeypatch):
    script = _ratio_over_time(monkeypatch)
    rounds = [
        script.Round(1.0, 80.0, 90.0, 1.125),
        script.Round(2.0, 74.0, 89.0, 1.203),
        script.Round(3.0, 79.0, 89.5, 1.133),
    ]
    assert script.summary(rounds, 1.15) == [
        "ratio: median 1.133, range 1.125-1.203",
        "rounds <= 1.15 (2 of 3): static 79.5 ms, dynamic 89.8 ms (medians)",
        "rounds > 1.15 (1 of 3): static 74.0 ms, dynamic 89.0 ms (medians)",
    ]
    assert script.summary(rounds, 1.0)[1:] == [
        "rounds > 1.0 (3 of 3): static 79.0 ms, dynamic 89.5 ms (medians)"
    ]


def test_ratio_over_time_runs_and_plots_on_a_small_model(monkeypatch, tmp_path, capsys):
    script = _ratio_over_time(monkeypatch)
    tiny = script.speed.Setup("tiny", lambda: script.speed.iq.models.resnet20(10), 8, 6, False)
    monkeypatch.setitem(script.speed.SETUPS, "resnet20", tiny)
    png = tmp_path / "rounds.png"
    assert script.main(["--rounds", "2", "--repeats", "1", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line[:5].strip().isdigit()]
    assert [r[0] for r in rows] == ["1", "2"]
    for _, _, static_ms, dynamic_ms, ratio in rows:
        # One repeat a round: the ratio is the round's dynamic/static, within what rounding
        # the printed times to 0.1 ms (and the ratio to 0.001) allows.
        static, dynamic = float(static_ms), float(dynamic_ms)
        assert static > 0 and dynamic > 0
        low = (dynamic - 0.05) / (static + 0.05) - 0.0005
        high = (dynamic + 0.05) / max(static - 0.05, 1e-9) + 0.0005
        assert low <= float(ratio) <= high
    assert "ratio: median" in out and png.stat().st_size > 0


def test_machine_results_and_tables_of_finished_runs_only(tmp_path, monkeypatch):
    script = _script()
    runs = script.plan(tmp_path / "data", tmp_path / "out", "learn", ["pact"], None, tmp_path)
    monkeypatch.setattr(script, "fit", lambda *a, **k: pytest.fail("trained with train=False"))
    assert script.run_all(runs, False, train=False) == []  # nothing finished yet
    room = {
        "bitops_p10_rel": 0.5,
        "bitops_p90_rel": 0.6,
        "bitops_p90_over_p10": 1.2,
        "rho_fp_loss": 0.25,
        "oracle_top1": 90.0,
        "oracle_bitops_rel": 0.4,
        "monotone_oracle_top1": 85.0,
        "monotone_oracle_bitops_rel": 0.45,
        "captured_share": 0.1,
        "uniform_top1": [80.0, 83.0, 84.0],
        "uniform_bitops_rel": [0.25, 0.5625, 1.0],
        "ranked_top1": {
            "fp_loss": {"top1": 81.25, "bits": [2, 4]},
            "cheapest_confidence": {"top1": 82.5, "bits": [3, 4]},
        },
    }
    dq = {"name": "pact_dq_budget3", "recipe": "dynamic", "method": "pact", "bits": [2, 3, 4]}
    dq.update(top1=83.5, bitops_rel=0.55, budget_bits=3.0, headroom=room)
    static = {"name": "pact_static4", "recipe": "static", "method": "pact", "bits": [4]}
    static.update(top1=84.0, bitops_rel=1.0)
    rows = script.machine_results([static, dq])
    assert rows[0] == {**static}
    assert rows[1]["bitops_p10"] == 0.5 and rows[1]["captured_share"] == 0.1
    assert rows[1]["oracle_bitops_rel"] == 0.4 and rows[1]["budget_bits"] == 3.0
    table = script.headroom_table([static, dq])
    assert "| pact_dq_budget3 | 83.50 | 0.550x | 1.20 | +0.250 |" in table
    assert "pact_static4" not in table and "90.00% at 0.400x" in table
    assert table.splitlines()[-1].endswith("| 81.25 (2+4) / 82.50 (3+4) |")
    assert rows[1]["ranked_top1"] == {"fp_loss": 81.25, "cheapest_confidence": 82.5}
    assert "layer_policy_top1" not in rows[1]  # measured before the layer policy was recorded
    room.update(layer_policy_top1=83.75, layer_policy_bitops_rel=0.56)
    row = script.machine_results([dq])[0]
    assert (row["layer_policy_top1"], row["layer_policy_bitops_rel"]) == (83.75, 0.56)


def test_vit_plan_quantizes_the_products_of_every_quantized_run_when_asked(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(
            "vit_cifar10", REPO / "benchmarks/vit_cifar10.py"
        )
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    plain = script.plan(tmp_path, tmp_path / "out", 1, 1, None, "lsq")
    runs = script.plan(tmp_path, tmp_path / "out", 1, 1, None, "lsq", product_bits=8)
    cfgs = [config.from_dict(raw) for raw in runs]
    assert [c.name for c in cfgs] == [
        "fp",
        "lsq_static4_products8",
        "lsq_dq_budget4_products8",
        "lsq_static3_products8",
    ]
    assert [c.quant.product_bits for c in cfgs[1:]] == [8, 8, 8]
    assert {c.model.init for c in cfgs[1:]} == {plain[1]["model"]["init"]}  # the same fp start
    assert len({c.out for c in cfgs} | {r["out"] for r in plain[1:]}) == 7


def test_product_speed_prints_both_timings_and_their_ratio(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # it imports speed.py beside it
    spec = importlib.util.spec_from_file_location(
        "product_speed", REPO / "benchmarks/product_speed.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--batch", "2", "--repeats", "1", "--threads", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if " ms " in line]
    assert [r[0] for r in rows] == ["training", "inference"]
    for row in rows:
        fp_ms, quantized_ms, ratio = float(row[-5]), float(row[-3]), float(row[-1].rstrip("x"))
        assert fp_ms > 0 and quantized_ms > 0
        low = (quantized_ms - 0.05) / (fp_ms + 0.05) - 0.005  # times rounded to 0.1 ms, ratio 0.01
        high = (quantized_ms + 0.05) / max(fp_ms - 0.05, 1e-9) + 0.005
        assert low <= ratio <= high


def test_digit_levers_combine_and_unknown_names_are_refused():
    # The other tests here plan the CIFAR-10 reproduction; this one the digits levers.
    script = _script("levers_digits")
    both = script.lever("stats+distill_highest")
    assert both == script.LEVERS["stats"] + script.LEVERS["distill_highest"]
    assert script.lever("default") == []
    reference, candidates = script.candidate_overrides([2, 3, 4])
    for overrides in script.LEVERS.values():  # every lever is a valid DQ config
        model = {"name": "digits_net", "init": "runs/fp"}
        raw = {"model": model, "data": {"name": "digits_contrast"}}
        cfg = config.from_dict(
            raw, [*script.QAT, *reference, "epochs=12", *script.DQ, *candidates, *overrides]
        )
        assert cfg.quant.bits == [2, 3, 4] and cfg.budget.target_bits == 3 and cfg.ref_bits == 3
    # Other candidates: the budget and the reference follow the middle one, in any order given.
    reference, candidates = script.candidate_overrides([3, 1, 2])
    cfg = config.from_dict(raw, [*script.QAT, *reference, *script.DQ, *candidates])
    assert cfg.quant.bits == [1, 2, 3] and cfg.budget.target_bits == 2 and cfg.ref_bits == 2
    with pytest.raises(ValueError, match="three distinct bit-widths"):
        script.candidate_overrides([2, 2, 4])
    # A budget of its own, between the lowest and highest candidate; the reference stays.
    reference, candidates = script.candidate_overrides([1, 2, 3], 1.5)
    cfg = config.from_dict(raw, [*script.QAT, *reference, *script.DQ, *candidates])
    assert cfg.quant.bits == [1, 2, 3] and cfg.budget.target_bits == 1.5 and cfg.ref_bits == 2
    with pytest.raises(ValueError, match=r"--budget-bits 0.5 is outside the candidates' 1..3"):
        script.candidate_overrides([1, 2, 3], 0.5)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown lever 'stat'; allowed: "):
        script.lever_name("stat+distill_highest")
    # The blind control zeroes the controller's input, and only while it is in force.
    from instaquant.controller import BitController

    controller = BitController(4, 3, 3)
    tap = torch.randn(2, 4, 5, 5)
    with script.controller_input("stats+blind"):
        assert torch.equal(controller.features(tap), torch.zeros(2, 4))
    with script.controller_input("stats"):
        assert controller.features(tap).abs().sum() > 0
    assert controller.features(tap).abs().sum() > 0


def test_digit_levers_can_fix_the_weights_of_every_quantized_run():
    script = _script("levers_digits")
    reference, candidates = script.candidate_overrides([2, 3, 4])
    raw = {"model": {"name": "digits_net"}, "data": {"name": "digits_contrast"}}
    for weight_bits in (None, 4):
        qat = script.qat_overrides(Path("runs/fp"), 6, reference, weight_bits)
        static = config.from_dict(raw, [*qat, "recipe=static", "quant.bits=[2]"])
        dq = config.from_dict(raw, [*qat, *script.DQ, *candidates])
        assert static.quant.weight_bits == dq.quant.weight_bits == weight_bits
        assert static.epochs == dq.epochs == 6 and dq.model.init == str(Path("runs/fp"))
        assert dq.quant.bits == [2, 3, 4] and dq.budget.target_bits == 3 and dq.ref_bits == 3


def test_level_oracle_allocates_bits_by_level_on_the_concave_hull():
    script = _script("levers_digits")
    # Static 2/3/4-bit at BitOPs 4/9, 1 and 16/9 of 3-bit's: an easy level right at every
    # bit-width, a hard one that needs 4 bits.
    static = {2: (4 / 9, [90.0, 50.0]), 3: (1.0, [90.0, 60.0]), 4: (16 / 9, [90.0, 90.0])}
    # At the 3-bit budget the easy level takes 2 bits (4/9) and the hard one spends the rest
    # split between 2 and 4 bits: a share t at 4 bits with (4/9 + 4/9 + t·12/9) / 2 = 1.
    t = 5 / 6
    top1, bitops = script.level_oracle(static, 1.0)
    assert bitops == pytest.approx(1.0)
    assert top1 == pytest.approx((90 + 50 + t * 40) / 2)  # 86.67, uniform 3 bits is 75
    # Where bits buy the same at every level, uniform bits are the best allocation.
    flat = {2: (4 / 9, [80.0, 70.0]), 3: (1.0, [90.0, 80.0]), 4: (16 / 9, [92.0, 82.0])}
    assert script.level_oracle(flat, 1.0) == pytest.approx((85.0, 1.0))
    # A budget above what the best allocation needs: it spends no more than that.
    assert script.level_oracle(static, 2.0) == pytest.approx((90.0, (4 / 9 + 16 / 9) / 2))


def test_per_layer_policy_gives_every_image_each_layers_most_frequent_choice(tmp_path):
    script = _script("per_layer_policy")
    shares = [[0.1, 0.2, 0.7], [0.5, 0.3, 0.2], [0.0, 1.0, 0.0]]
    assert script.majority_bits(shares, [2, 3, 4]) == [4, 2, 3]

    from instaquant.engine import fit

    tiny = ["data.name=digits", "data.limit=192", "data.batch_size=32", "model.name=digits_net"]
    raw = {"name": "dq", "out": str(tmp_path / "dq")}
    dq = ["recipe=dynamic", "quant.bits=[2,3,4]", "budget.target_bits=3", "epochs=1"]
    fit(config.from_dict(raw, [*tiny, *dq]), progress=False)
    row = script.measure(tmp_path / "dq")
    # Every test image runs at the policy's bits: BitOPs those of one image, top-1 by hand.
    from instaquant.builder import load_for_eval
    from instaquant.data import build_loaders

    cfg, model, _ = load_for_eval(tmp_path / "dq" / "best.pt", [])
    _, test_loader, _ = build_loaders(cfg.data, cfg.seed, torch.device("cpu"))
    model.eval()
    right = total = 0
    with torch.no_grad(), model.forced_bits(row["layer_policy_bits"]):
        for x, y in test_loader:
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
            assert model.last.bitops.unique().numel() == 1
        policy_bitops = float(model.last.bitops[0]) / model.static_bitops(cfg.ref_bits)
    assert row["layer_policy"][0] == pytest.approx(100.0 * right / total)
    assert row["layer_policy"][1] == pytest.approx(policy_bitops)


def test_predictability_auc_and_probe():
    script = _script("predictability")
    positive = torch.tensor([True, True, False, False, False])
    assert script.auc(torch.tensor([5.0, 4, 3, 2, 1]), positive) == 1.0
    assert script.auc(torch.tensor([1.0, 2, 3, 4, 5]), positive) == 0.0
    # Positives at 4 and 2 against 3, 2, 1: 3 wins + 1.5 (the tie) of 6 pairs.
    assert script.auc(torch.tensor([4.0, 2, 3, 2, 1]), positive) == pytest.approx(4.5 / 6)
    assert script.auc(torch.zeros(3), torch.zeros(3, dtype=torch.bool)) != 0.5  # NaN: one class
    # A probe fit on one half ranks the other half: separable by the first feature alone.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=g, dtype=torch.float64)
    y = x[:, 0] > 0.3
    assert script.auc(script.probe_scores(x, y), y) > 0.97
    noise = torch.rand(400, generator=g) < 0.5  # a label no feature knows
    assert 0.35 < script.auc(script.probe_scores(x, noise), noise) < 0.65


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="the [export] extra is not installed",
)
def test_exported_top1_pads_the_last_batch_and_keeps_every_image(tmp_path):
    import warnings

    from helpers import dynamic_resnet20, varied_images
    from instaquant.export import export

    script = _script("exported_top1")
    model = dynamic_resnet20("pact")
    model.train()
    model(varied_images(12))
    model = model.eval().float()
    x = varied_images(10, seed=4).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = export(model, x[:4], tmp_path / "m.onnx")  # batch 4: 10 images = 4 + 4 + 2
    labels = torch.arange(10) % 10
    with torch.no_grad():
        expected = model(x).argmax(1)
        bitops = model.last.bitops
    preds, got_labels, got_bitops = script.onnx_outputs(
        graph, [(x[:7], labels[:7]), (x[7:], labels[7:])]
    )
    assert len(preds) == len(got_bitops) == 10 and (got_labels == labels.numpy()).all()
    assert (preds == expected.numpy()).mean() >= 0.9  # rounding-boundary flips aside
    torch.testing.assert_close(
        torch.from_numpy(got_bitops).double(), bitops.double(), rtol=1e-6, atol=0
    )


def test_seed_oracle_counts_an_image_right_where_any_view_is():
    script = _script("seed_oracle")
    a = torch.tensor([1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    row = script.oracle_row("a / b", "seeds", [a, b])
    assert row["top1"] == [62.5, 62.5]
    assert row["differ"] == 25.0  # images 1 and 2
    assert row["oracle_top1"] == 75.0 and row["oracle_gain"] == 12.5


def test_seed_oracle_groups_runs_that_differ_only_in_their_seed(tmp_path):
    from instaquant.engine import fit

    script = _script("seed_oracle")
    tiny = ["data.name=digits", "data.limit=192", "data.batch_size=32", "model.name=digits_net"]
    static = ["recipe=static", "quant.bits=[3]", "epochs=1"]
    dq = ["recipe=dynamic", "quant.bits=[2,3,4]", "budget.target_bits=3", "epochs=1"]
    runs = (("s0", 0, static), ("s1", 1, static), ("dq", 0, dq), ("fp", 0, ["recipe=fp"]))
    for name, seed, kind in runs:
        raw = {"name": name, "out": str(tmp_path / name), "seed": seed}
        fit(config.from_dict(raw, [*tiny, *kind, "epochs=1"]), progress=False)
    with pytest.raises(SystemExit, match="is a 'fp' run: give static or dynamic"):
        script.outcomes(tmp_path / "fp")
    runs = [tmp_path / n for n in ("s0", "s1", "dq")]
    configs, results = {}, {}
    for run in runs:
        configs[run], results[run] = script.outcomes(run)
        script.check_against_summary(run, results[run])  # the DQ views match its headroom
    assert sorted(results[runs[2]]) == [2, 3, 4] and list(results[runs[0]]) == [3]
    summary = json.loads((runs[0] / "summary.json").read_text())["runs"][0]
    assert 100.0 * float(results[runs[0]][3].double().mean()) == pytest.approx(summary["top1"])
    table = script.rows(results, configs)
    seeds = [r for r in table if r["kind"] == "seeds"]
    assert [r["views"] for r in seeds] == ["s0 / s1 at 3 bits"]  # not the DQ run's 3 bits
    bits = [r["views"] for r in table if r["kind"] == "bits"]
    assert bits == [f"dq at {s} bits" for s in ("2/3", "2/4", "3/4", "2/3/4")]


def _policy_script():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return _script("policy_static")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_policy_static_trains_the_runs_layer_policy_as_the_static_runs_do(tmp_path):
    script = _policy_script()
    repro = _script()
    runs = repro.plan(
        tmp_path / "data", tmp_path / "out", "learn", ["pact"], None, tmp_path / "fp.pt"
    )
    dq = next(r for r in repro.lever_plan(runs, tmp_path / "out", ["bits345+budget070"]))
    run = Path(dq["out"])
    run.mkdir(parents=True)
    config.save(config.from_dict(dq), run / "config.yaml")
    policy = [4, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 3]
    entry = {"headroom": {"layer_policy_bits": [policy, policy]}}
    (run / "summary.json").write_text(json.dumps({"runs": [entry]}))
    quant = script.policy_of(run)
    assert quant["bits"] == [3] and quant["method"] == "pact"  # bits345's fixed bits
    names = [f"layer{s}.{b}.conv{c}" for s in (2, 3) for b in range(3) for c in (1, 2)]
    assert quant["layer_bits"] == dict(zip(names, policy, strict=True))
    plans = script.policy_plan(runs, tmp_path / "out", quant, "p", [0, 1])
    assert [p["name"] for p in plans] == ["pact_static_policy_p", "pact_static_policy_p_seed1"]
    static4 = config.from_dict(next(r for r in runs if r["name"] == "pact_static4")).to_dict()
    for raw in plans:
        cfg = config.from_dict(raw).to_dict()
        diff = {k for k in cfg if k not in ("name", "out") and cfg[k] != static4[k]}
        assert diff <= {"quant", "seed"} and cfg["seed"] == (raw["name"][-1] == "1")
        assert cfg["quant"] == {**static4["quant"], "bits": [3], "layer_bits": quant["layer_bits"]}
    taught = script.policy_plan(runs, tmp_path / "out", quant, "p", [0], "fp")
    reference = script.policy_plan(runs, tmp_path / "out", 3, "p", [1], "fp")
    assert [p["name"] for p in taught + reference] == [
        "pact_static_policy_p+distill_fp",
        "pact_static3+distill_fp_seed1",
    ]
    static3 = config.from_dict(next(r for r in runs if r["name"] == "pact_static3")).to_dict()
    assert config.from_dict(reference[0]).to_dict()["quant"] == static3["quant"]
    for raw, bits in ((taught[0], [3]), (reference[0], [3])):
        cfg = config.from_dict(raw).to_dict()
        assert cfg["distill"]["teacher"] == "fp" and cfg["quant"]["bits"] == bits
    assert "layer_bits" not in reference[0]["quant"]
    (run / "summary.json").write_text(json.dumps({"runs": [{"headroom": {}}]}))
    with pytest.raises(SystemExit, match="records no layer policy"):
        script.policy_of(run)


def test_policy_static_tables_of_separate_processes_are_merged(tmp_path):
    script = _policy_script()
    path = tmp_path / "policy_static_p.json"
    assert script.merged(path, [{"name": "a", "top1": 1.0}]) == [{"name": "a", "top1": 1.0}]
    path.write_text(json.dumps({"runs": [{"name": "a", "top1": 1.0}, {"name": "b"}]}))
    rows = script.merged(path, [{"name": "a", "top1": 2.0}, {"name": "c"}])
    assert rows == [{"name": "b"}, {"name": "a", "top1": 2.0}, {"name": "c"}]
