"""The CIFAR-10 reproduction's run plan: every run is a valid config, with the settings the docs state."""

import importlib.util
from pathlib import Path

import pytest

from instaquant import config

REPO = Path(__file__).resolve().parent.parent


def _script():
    path = REPO / "benchmarks" / "reproduce_cifar10.py"
    spec = importlib.util.spec_from_file_location("reproduce_cifar10", path)
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


def test_ablations_without_pact_stop_before_any_training(tmp_path, monkeypatch, capsys):
    script = _script()
    monkeypatch.setattr(script, "run_all", lambda *a: pytest.fail("trained before checking"))
    argv = ["reproduce_cifar10.py", "--quick", "--ablations", "--methods", "dorefa"]
    monkeypatch.setattr("sys.argv", [*argv, "--root", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        script.main()
    assert stop.value.code == 2 and "include pact in --methods" in capsys.readouterr().err
