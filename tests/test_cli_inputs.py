"""Command-line input handling: where overrides may sit, and bad input as one-line errors."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from instaquant import config as C
from instaquant.builder import resolve_device
from instaquant.cli import main
from instaquant.demo import common_reference

EMPTY = Path(__file__).parent / "empty_config.yaml"  # every key from the command line
TINY = ["data.name=digits", "data.limit=64", "data.batch_size=32", "model.name=digits_net"]


def _error(capsys) -> str:
    """The one line the CLI printed on stderr."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _train(tmp_path, *args) -> list[str]:
    return ["train", "-c", str(EMPTY), *TINY, f"out={tmp_path / 'run'}", *args, "--no-progress"]


# --------------------------------------------------------------------------- overrides anywhere


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An fp and a static run, trained with overrides placed after an option."""
    tmp = tmp_path_factory.mktemp("runs")
    fp = ["-c", str(EMPTY), f"out={tmp / 'fp'}", "--no-progress", *TINY, "recipe=fp"]
    assert main(["train", *fp, "epochs=1"]) == 0
    static = ["-c", str(EMPTY), f"out={tmp / 's3'}", "--no-progress", *TINY, "recipe=static"]
    assert main(["train", *static, "quant.bits=[3]", f"model.init={tmp / 'fp'}"]) == 0
    return tmp


def test_train_overrides_after_an_option_are_applied(runs):
    cfg = C.load(runs / "fp" / "config.yaml")
    assert cfg.recipe == "fp" and cfg.epochs == 1 and cfg.data.limit == 64
    assert C.load(runs / "s3" / "config.yaml").quant.bits == [3]


def test_eval_and_report_overrides_after_an_option(runs, capsys):
    assert main(["eval", str(runs / "s3"), "--json", "data.limit=32", "device=cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 32
    args = ["report", str(runs / "s3"), "--fp", str(runs / "fp"), "data.limit=32", "device=cpu"]
    assert main(args) == 0
    assert json.loads((runs / "s3" / "report" / "report.json").read_text())["samples"] == 32


def test_compare_runs_around_plot_option(runs, tmp_path, capsys):
    plot = tmp_path / "cmp.png"
    assert main(["compare", str(runs / "fp"), "--plot", str(plot), str(runs / "s3")]) == 0
    out = capsys.readouterr().out
    assert "static   3" in out and "fp       32" in out and plot.is_file()


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_stop_after_epoch_below_one_is_refused(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as info:
        main(_train(tmp_path, "--stop-after-epoch", value))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"instaquant train: error: argument --stop-after-epoch: expected an epoch number >= 1, "
        f"got {value!r}" in err
    )
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- config values


def test_cache_yes_no_read_as_booleans_by_yaml(tmp_path):
    assert C.from_dict({}, ["data.cache=no"]).data.cache == "no"
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  cache: yes\n")
    cfg = C.load(path)
    assert cfg.data.cache == "yes"
    C.save(cfg, path)
    assert C.load(path).data.cache == "yes"
    with pytest.raises(C.ConfigError) as info:
        C.from_dict({}, ["data.cache=maybe"])
    assert str(info.value) == (
        "config key 'data.cache': 'maybe' is not allowed; allowed: ('auto', 'yes', 'no')"
    )


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "data.image_size=-3",
            "config key 'data.image_size': -3 must be >= 1 (or null for the dataset's own size)",
        ),
        (
            "data.workers=-1",
            "config key 'data.workers': -1 must be >= 0 (0 loads in the main process)",
        ),
        (
            "device=cuda:abc",
            "config key 'device': 'cuda:abc' is not a device; "
            "allowed: auto, cpu, cuda, cuda:N (N a device index), mps",
        ),
    ],
)
def test_bad_config_values_are_one_line_errors(tmp_path, capsys, override, message):
    assert main(_train(tmp_path, override)) == 2
    assert _error(capsys) == f"instaquant: error: {message}"


def test_absent_devices_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert main(_train(tmp_path, "device=mps")) == 2
    assert _error(capsys) == (
        "instaquant: error: device 'mps' asked for but MPS is not available; use device=cpu"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(C.UserError) as info:
        resolve_device("cuda:2")
    assert str(info.value) == "device 'cuda:2': this machine has 2 CUDA device(s), cuda:0..cuda:1"


# --------------------------------------------------------------------------- output paths


def test_run_folder_that_cannot_be_made(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "sub"):
        args = ["train", "-c", str(EMPTY), *TINY, f"out={out}", "--no-progress"]
        assert main(args) == 2
        assert _error(capsys) == (
            f"instaquant: error: run folder (out=) {str(out)!r}: {str(blocker)!r} is a file; "
            "give a folder path"
        )
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/sys is Linux's")
def test_run_folder_where_nothing_may_be_created(tmp_path, capsys):
    args = ["train", "-c", str(EMPTY), *TINY, "out=/sys/instaquant-test", "--no-progress"]
    assert main(args) == 2
    err = _error(capsys)
    assert err.startswith("instaquant: error: run folder (out=) '/sys/instaquant-test' cannot be")
    assert err.endswith("; give a writable folder path")


def test_demo_out_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["demo", "--out", str(blocker), "--no-progress"]) == 2
    assert _error(capsys) == (
        f"instaquant: error: --out folder {str(blocker)!r}: {str(blocker)!r} is a file; "
        "give a folder path"
    )


# --------------------------------------------------------------------------- compare


def _entry(name, recipe, bits, ref, mean, rel, **extra):
    return {
        "name": name,
        "recipe": recipe,
        "method": None if recipe == "fp" else "pact",
        "bits": bits,
        "top1": 90.0,
        "bitops_mean": mean,
        "bitops_rel": rel,
        "bits_mean": None if bits is None else float(sum(bits) / len(bits)),
        "reference_bits": ref,
        **extra,
    }


def _summary(path: Path, *runs) -> str:
    path.write_text(json.dumps({"runs": list(runs)}))
    return str(path)


def test_compare_puts_runs_of_different_references_on_one_scale(tmp_path, capsys, monkeypatch):
    from instaquant import report

    plotted = []
    monkeypatch.setattr(report, "plot_accuracy_vs_bitops", lambda r, p: plotted.extend(r) or p)
    a = _summary(tmp_path / "a.json", _entry("s4", "static", [4], 4, 1600.0, 1.0))
    b = _summary(
        tmp_path / "b.json",
        _entry("s3", "static", [3], 3, 900.0, 1.0),
        _entry("dq", "dynamic", [2, 3, 4], 3, 1200.0, 1200.0 / 900.0),
        _entry("fp", "fp", None, None, None, None),
    )
    assert main(["compare", a, b, "--plot", str(tmp_path / "p.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[5] for line in lines[2:6]] == ["1.000x", "0.562x", "0.750x", "-"]
    assert lines[6] == (
        "BitOPs relative to the static 4-bit model of the first quantized run "
        "('s4', 1600 BitOPs per image)."
    )
    assert [r["bitops_rel"] for r in plotted] == [1.0, 900 / 1600, 1200 / 1600, None]
    assert [r["reference_bits"] for r in plotted] == [4, 4, 4, None]


def test_compare_of_full_precision_runs_only(tmp_path, capsys):
    a = _summary(tmp_path / "a.json", _entry("fp", "fp", None, None, None, None))
    plot = tmp_path / "p.png"
    assert main(["compare", a, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == "No quantized runs: BitOPs apply to quantized models only."
    assert plot.is_file()


def test_common_reference_without_absolute_bitops():
    runs = [
        _entry("s4", "static", [4], 4, None, 1.0),
        _entry("s4b", "static", [4], 4, None, 0.9),
        _entry("s3", "static", [3], 3, None, 1.0),
    ]
    rebased, line = common_reference(runs)
    assert [r["bitops_rel"] for r in rebased] == [1.0, 0.9, None]
    assert runs[2]["bitops_rel"] == 1.0  # the caller's entries are left as they were
    assert line == (
        "BitOPs relative to the static 4-bit model of the first quantized run. Not shown for "
        "'s3': another reference bit-width and no absolute BitOPs in the summary to convert."
    )


def test_table_writes_fixed_weights_and_the_activations_mean():
    from instaquant.demo import format_table

    # Weights at 4 bits, activations at 1 or chosen; the reference is static W2A2 (4 per MAC).
    runs = [
        _entry("fp", "fp", None, None, None, None),
        _entry("static1", "static", [1], 2, 400.0, 1.0, weight_bits=4, bits_mean=2.5),
        _entry("dq", "dynamic", [1, 2, 3], 2, 760.0, 1.9, weight_bits=4, bits_mean=2.95),
        _entry("s3", "static", [3], 3, 900.0, 1.0),
    ]
    rows = {r.split()[0]: r.split() for r in format_table(runs).splitlines()}
    assert rows["static1"][2:6] == ["W4A1", "90.00", "A", "1.00"]
    assert rows["dq"][2:7] == ["W4A1,2,3", "90.00", "A", "1.90", "1.900x"]
    assert rows["s3"][2:6] == ["3", "90.00", "3.00", "2.250x"]
    assert rows["fp"][2:5] == ["32", "90.00", "-"]
    # The plot labels static points the same way (a joint-bits run keeps "3-bit").
    from instaquant.report import fixed_weights_label

    assert [fixed_weights_label(r) for r in runs] == [None, "W4A1", "W4A1,2,3", None]


def test_demo_table_counts_bitops_against_static_w4a2_and_scores_dq_against_the_line():
    from instaquant.demo import format_table, relative_to_run, static_line_margin

    # The demo's runs: static W4A1/A2/A3 (BitOPs 400/800/1200) and DQ at 600, halfway.
    runs = [
        _entry("fp", "fp", None, None, None, None),
        _entry("static1", "static", [1], 2, 400.0, 1.0, weight_bits=4, top1=55.0),
        _entry("static2", "static", [2], 2, 800.0, 2.0, weight_bits=4, top1=69.0),
        _entry("static3", "static", [3], 2, 1200.0, 3.0, weight_bits=4, top1=71.0),
        _entry("dq", "dynamic", [1, 2, 3], 2, 600.0, 1.5, weight_bits=4, top1=66.0),
    ]
    rebased, line = relative_to_run(runs, "static2")
    assert [r["bitops_rel"] for r in rebased] == [None, 0.5, 1.0, 1.5, 0.75]
    assert line == "BitOPs relative to static W4A2." and runs[4]["bitops_rel"] == 1.5
    assert {r.get("reference_name") for r in rebased[1:]} == {"static W4A2"}
    table = format_table(runs, relative_to="static2")
    assert "0.750x" in table and line in table
    # The line joining W4A1 (55%) and W4A2 (69%) is at 62% halfway: DQ is 4 points above it.
    assert static_line_margin(runs) == (
        "DQ 66.00% against static at equal BitOPs (62.00% on the line joining the static "
        "models): +4.00 points"
    )
    assert "no static models" in static_line_margin(runs[:1] + runs[4:])
    with pytest.raises(ValueError, match="no quantized run named 'static9'"):
        relative_to_run(runs, "static9")


HINT = "give a run folder or the summary.json that train or demo wrote"


@pytest.mark.parametrize(
    "text, message",
    [
        ("{}", "holds no list of runs under 'runs'; " + HINT),
        ('{"runs": []}', "holds no list of runs under 'runs'; " + HINT),
        (
            '{"runs": [{"name": "a", "recipe": "fp", "method": null, "top1": 1.0}]}',
            "run 0 lacks bits; each run needs name, recipe, method, bits, top1",
        ),
        ("not json", "is not valid JSON (Expecting value: line 1 column 1 (char 0)); " + HINT),
    ],
)
def test_compare_of_a_bad_summary_names_the_file(tmp_path, capsys, text, message):
    path = tmp_path / "summary.json"
    path.write_text(text)
    assert main(["compare", str(tmp_path)]) == 2
    err = _error(capsys)
    assert err.startswith(f"instaquant: error: {str(path)!r}") and err.endswith(message)


def test_compare_plot_under_a_file(tmp_path, capsys):
    a = _summary(tmp_path / "a.json", _entry("s4", "static", [4], 4, 1600.0, 1.0))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["compare", a, "--plot", str(blocker / "x.png")]) == 2
    assert _error(capsys) == (
        f"instaquant: error: --plot folder {str(blocker)!r}: {str(blocker)!r} is a file; "
        "give a folder path"
    )


def test_compare_plots_around_runs_it_cannot_place(tmp_path, capsys):
    """A run left off the common scale is left off the plot too, which used to crash on it."""
    a = _summary(tmp_path / "a.json", _entry("s4", "static", [4], 4, None, 1.0))
    b = _summary(tmp_path / "b.json", _entry("s3", "static", [3], 3, None, 1.0))
    png = tmp_path / "cmp.png"
    assert main(["compare", a, b, "--plot", str(png)]) == 0
    assert "Not shown for 's3'" in capsys.readouterr().out and png.stat().st_size > 0


def test_common_reference_names_the_base_run_when_models_differ():
    """Same reference bits but different models: the rescaled figures are not each run's own."""
    runs = [
        _entry("small", "static", [4], 4, 1000.0, 1.0),
        _entry("large", "static", [4], 4, 3000.0, 1.0),
    ]
    rebased, line = common_reference(runs)
    assert [r["bitops_rel"] for r in rebased] == [1.0, 3.0]
    assert line == (
        "BitOPs relative to the static 4-bit model of the first quantized run "
        "('small', 1000 BitOPs per image)."
    )


def test_output_folder_behind_an_unsearchable_parent(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root searches every folder")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o000)
    try:
        assert main(["demo", "--out", str(locked / "inner" / "out")]) == 2
    finally:
        locked.chmod(0o700)
    assert "cannot be reached (Permission denied)" in capsys.readouterr().err
