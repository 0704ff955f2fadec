"""Training recipes, checkpoints, evaluation and the command line, on tiny runs."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import make_image_folder
from instaquant import config as C
from instaquant.builder import load_for_eval
from instaquant.cli import main
from instaquant.engine import fit, lr_factor
from instaquant.evaluation import evaluate

ROOT = Path(__file__).resolve().parent.parent
TINY = ["data.name=digits", "data.limit=192", "data.batch_size=32", "model.name=digits_net"]


def _cfg(tmp_path, name, *extra):
    return C.from_dict({"name": name, "out": str(tmp_path / name)}, [*TINY, *extra])


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp")
    fit(_cfg(tmp, "fp", "recipe=fp", "epochs=2"), progress=False)
    return tmp / "fp"


def test_fp_run_writes_its_files(fp_run):
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "summary.json"):
        assert (fp_run / name).is_file(), name
    rows = [json.loads(line) for line in (fp_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    summary = json.loads((fp_run / "summary.json").read_text())
    assert summary["runs"][0]["recipe"] == "fp" and "bitops_convention" in summary


@pytest.mark.parametrize("recipe, bits", [("static", "[3]"), ("dynamic", "[2, 3, 4]")])
def test_quantized_recipes_from_fp_init_and_exact_eval(tmp_path, fp_run, recipe, bits):
    cfg = _cfg(
        tmp_path,
        recipe,
        f"recipe={recipe}",
        f"quant.bits={bits}",
        "epochs=1",
        f"model.init={fp_run}",
        "optim.lr=0.02",
    )
    entry = fit(cfg, progress=False)
    assert entry["bitops_rel"] > 0 and entry["bits"] == json.loads(bits)
    if recipe == "dynamic":
        assert entry["controller_overhead"] < 0.05
        fractions = torch.tensor(entry["candidate_fraction"])
        torch.testing.assert_close(
            fractions.sum(-1), torch.ones(fractions.shape[0]), atol=1e-9, rtol=0
        )
        room = entry["headroom"]  # measured on the test set at the end of training
        assert room["controller_top1"] == pytest.approx(entry["top1"], abs=1e-9)
        assert room["controller_bitops_rel"] == pytest.approx(entry["bitops_rel"], abs=1e-9)
        assert room["oracle_top1"] >= max(room["uniform_top1"])
        assert room["rho_fp_loss"] is None or -1 <= room["rho_fp_loss"] <= 1  # model.init given
    else:
        assert "headroom" not in entry
    for name in ("last.pt", "best.pt"):
        ckpt_cfg, model, extra = load_for_eval(tmp_path / recipe / name)
        recorded = extra["ckpt"]["metrics"]["test_top1"]
        first = evaluate(model, extra["test_loader"], ckpt_cfg.ref_bits).metrics
        second = evaluate(model, extra["test_loader"], ckpt_cfg.ref_bits).metrics
        assert first["top1"] == recorded
        assert first == second
        if recipe == "dynamic":
            assert first["bitops_mean"] == extra["ckpt"]["metrics"]["test_bitops_mean"]


def test_quant_params_get_no_weight_decay(tmp_path):
    from instaquant.builder import build_model
    from instaquant.data import describe
    from instaquant.engine import make_optimizer

    cfg = _cfg(tmp_path, "opt", "recipe=dynamic", "quant.bits=[2, 3]")
    model = build_model(cfg, describe(cfg.data), torch.device("cpu"))
    groups = {g["name"]: g for g in make_optimizer(model, cfg).param_groups}
    assert groups["quantizer"]["weight_decay"] == 0.0
    assert groups["backbone"]["weight_decay"] == cfg.optim.weight_decay
    alphas = {id(p) for n, p in model.named_parameters() if n.endswith("aq.alpha")}
    assert alphas and alphas <= {id(p) for p in groups["quantizer"]["params"]}
    assert all(id(p) not in alphas for p in groups["backbone"]["params"])


def test_lr_schedules():
    cfg = C.from_dict(
        {"epochs": 10, "optim": {"schedule": "multistep", "milestones": [3, 6], "warmup_epochs": 1}}
    )
    assert (
        lr_factor(cfg, 0.5) < 1
        and lr_factor(cfg, 2) == 1
        and lr_factor(cfg, 4) == pytest.approx(0.1)
    )
    assert lr_factor(cfg, 7) == pytest.approx(0.01)
    cos = C.from_dict({"epochs": 10})
    assert (
        lr_factor(cos, 0) == 1
        and lr_factor(cos, 5) == pytest.approx(0.5)
        and lr_factor(cos, 10) < 1e-9
    )


def test_existing_run_is_not_overwritten(tmp_path, fp_run):
    cfg = C.from_dict({"name": "fp", "out": str(fp_run)}, [*TINY, "recipe=fp"])
    with pytest.raises(C.UserError, match="already holds a run"):
        fit(cfg, progress=False)


def test_cli_train_imagefolder_acceptance_command(tmp_path, capsys):
    root = make_image_folder(tmp_path / "imgs", classes=tuple("abcdefghij"), per_class=4, size=32)
    code = main(
        [
            "train",
            "-c",
            str(ROOT / "configs/cifar10_resnet20_pact_dq.yaml"),
            "data.name=imagefolder",
            f"data.root={root}",
            "epochs=1",
            "data.limit=512",
            f"out={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.batch_size=16",
            "--no-progress",
        ]
    )
    assert code == 0
    entry = json.loads((tmp_path / "run" / "summary.json").read_text())["runs"][0]
    assert entry["recipe"] == "dynamic" and entry["bits"] == [3, 4, 5]
    ckpt_cfg = C.load(tmp_path / "run" / "config.yaml")
    assert ckpt_cfg.data.image_size == 32 and ckpt_cfg.data.limit == 512
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run" / "last.pt"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["top1"] == printed["recorded_top1"] == entry["top1"]
    assert printed["samples"] == 40


@pytest.mark.parametrize(
    "args, message",
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["quant.bits=[0, 4]"], "outside the allowed range 1..8"),
        (["quant.bits=[]"], "'quant.bits' is empty"),
        (["data.name=imagefolder", "data.root=/nonexistent/dir"], "needs train/ and val/"),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, args, message):
    code = main(
        [
            "train",
            "-c",
            str(ROOT / "configs/cifar10_resnet20_pact_dq.yaml"),
            *args,
            f"out={tmp_path / 'x'}",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_checkpoint_of_another_architecture(tmp_path, fp_run, capsys):
    code = main(
        [
            "train",
            "-c",
            str(ROOT / "configs/cifar10_resnet20_pact_dq.yaml"),
            *TINY[:3],
            "model.name=resnet20",
            f"model.init={fp_run}",
            f"out={tmp_path / 'y'}",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "holds a 'digits_net' model but this run builds 'resnet20'" in err
    assert len(err.splitlines()) == 1


def test_cli_eval_missing_checkpoint_and_cost(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["cost", "-c", str(ROOT / "configs/cifar10_resnet20_pact_dq.yaml")]) == 0
    out = capsys.readouterr().out
    assert "layer3.2.conv2" in out and "full-precision layers are not counted" in out


def test_demo_config_file_matches_the_demo():
    from instaquant.demo import digits_dq_dict

    in_code = C.from_dict(digits_dq_dict(Path("runs/demo")))
    in_file = C.load(ROOT / "configs/digits_demo.yaml")
    assert in_file == in_code


def test_demo_resume_keeps_finished_runs_and_trains_the_rest(tmp_path, monkeypatch):
    from instaquant import demo

    full = demo.demo_configs

    def shrunk(out):
        cfgs = full(out)
        for cfg in cfgs:
            cfg.epochs, cfg.data.limit = 1, 64
        return cfgs

    monkeypatch.setattr(demo, "demo_configs", shrunk)
    out = tmp_path / "demo"
    first = demo.run_demo(out, progress=False)
    kept = {
        p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/last.pt") if p.parent.name != "dq"
    }
    shutil.rmtree(out / "dq")  # as if stopped before the DQ run
    again = demo.run_demo(out, progress=False, resume=True)
    assert {
        p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/last.pt") if p.parent.name != "dq"
    } == kept
    assert (out / "dq" / "last.pt").is_file()
    assert [r["name"] for r in again["runs"]] == [r["name"] for r in first["runs"]]
    for a, b in zip(first["runs"][:-1], again["runs"][:-1], strict=True):
        assert a["top1"] == b["top1"] and a["name"] == b["name"]


def test_evaluation_reload_keeps_the_annealed_temperature(tmp_path):
    """``tau`` is no tensor of the state dict: a reloaded run must sample (``sample_in_eval``)
    at the temperature its training ended with, not the starting one."""
    from instaquant.engine import train_model

    extra = ["recipe=dynamic", "quant.bits=[2, 3, 4]", "quant.tau=1.0", "quant.tau_final=0.2"]
    cfg = _cfg(tmp_path, "dq", "epochs=3", "quant.sample_in_eval=true", *extra)
    _, trained = train_model(cfg, progress=False)
    assert trained.tau == pytest.approx(0.2)
    _, reloaded, _ = load_for_eval(tmp_path / "dq" / "last.pt")
    assert reloaded.tau == pytest.approx(0.2)
    fit(_cfg(tmp_path, "stopped", "epochs=3", *extra), progress=False, stop_after_epoch=2)
    _, halfway, _ = load_for_eval(tmp_path / "stopped" / "last.pt")
    assert halfway.tau == pytest.approx(0.2**0.5)  # epoch 2 of 3: halfway, exponentially
