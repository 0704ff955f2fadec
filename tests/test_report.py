"""Per-sample analysis, plots and the run report, on tiny digits runs."""

import base64
import csv
import json
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from helpers import make_image_folder
from instaquant import config as C
from instaquant import report
from instaquant.analysis import (
    _check_fp_compatible,
    boundary_tie,
    extremes,
    quantile_bins,
    rankdata,
    spearman,
)
from instaquant.cli import main
from instaquant.data import build_loaders
from instaquant.engine import fit
from instaquant.report import pareto_front, write_report

# On the CPU: the assertions below hold the outcome of these CPU-trained runs.
TINY = [
    "data.name=digits",
    "data.limit=128",
    "data.batch_size=64",
    "model.name=digits_net",
    "device=cpu",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fit(out: Path, name: str, *extra: str) -> None:
    fit(C.from_dict({"name": name, "out": str(out / name)}, [*TINY, *extra]), progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """fp, then dynamic and static fine-tuned from it; the DQ report written once."""
    out = tmp_path_factory.mktemp("runs")
    _fit(out, "fp", "recipe=fp", "epochs=1")
    init = f"model.init={out / 'fp'}"
    _fit(out, "dq", "recipe=dynamic", "quant.bits=[2, 3, 4]", "epochs=1", init, "optim.lr=0.02")
    _fit(out, "static3", "recipe=static", "quant.bits=[3]", "epochs=1", init, "optim.lr=0.02")
    paths = write_report(out / "dq", fp_run=out / "fp")
    return out, paths


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src") or "")


# --------------------------------------------------------------------------- statistics


def test_rankdata_averages_ties_hand_example():
    ranks = rankdata(torch.tensor([10.0, 20.0, 20.0, 5.0, 20.0]))
    torch.testing.assert_close(
        ranks, torch.tensor([2.0, 4.0, 4.0, 1.0, 4.0], dtype=torch.float64), atol=0, rtol=0
    )


def test_spearman_hand_example_and_edge_cases():
    # ranks of y: 1, 2, 3.5, 5, 3.5 -> sum(dx*dy) = 8, sum(dx^2) = 10, sum(dy^2) = 9.5
    x, y = torch.tensor([1.0, 2, 3, 4, 5]), torch.tensor([5.0, 6, 7, 8, 7])
    assert spearman(x, y) == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, torch.full((5,), 2.0)))  # constant: no ordering
    with pytest.raises(ValueError, match="equal lengths"):
        spearman(x, y[:3])


def test_spearman_agrees_with_scipy_on_tied_data():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (200,), generator=gen).double()
    y = x + torch.randint(0, 4, (200,), generator=gen).double()
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy())[0], abs=1e-12)


def test_quantile_bins_keep_ties_together():
    values = torch.tensor([1.0, 1, 1, 1, 1, 2, 3, 4])
    bins = quantile_bins(values, 4)
    assert len(set(bins[:5].tolist())) == 1
    assert bins.tolist() == sorted(bins.tolist()) and int(bins[-1]) == 3


def test_extremes_are_disjoint_and_ordered():
    class Fake:
        bitops = torch.tensor([3.0, 1, 1, 2, 3, 1])
        difficulty = torch.zeros(6)  # no difficulty order: ties fall back to the index
        n = 6

    cheap, costly = extremes(Fake(), 2)
    assert cheap.tolist() == [1, 2] and costly.tolist() == [4, 0]
    cheap, costly = extremes(Fake(), 10)  # clipped to n // 2 so the sets never overlap
    assert len(cheap) == len(costly) == 3 and not set(cheap.tolist()) & set(costly.tolist())


def test_extremes_break_cost_ties_by_difficulty():
    class Fake:
        bitops = torch.tensor([1.0, 1, 1, 2, 2, 2, 2])
        difficulty = torch.tensor([0.5, 0.1, 0.3, 0.2, 0.9, 0.4, 0.4])
        ref_bitops = 4.0
        n = 7

    cheap, costly = extremes(Fake(), 2)
    # Cheapest: equal cost, easiest first; most expensive: equal cost, hardest first, then
    # (5 and 6 equally hard) the higher index first, the ascending order read backwards.
    assert cheap.tolist() == [1, 2] and costly.tolist() == [4, 6]
    assert boundary_tie(Fake(), cheap) == (0.25, 2, 3)  # 2 of the 3 images costing 1
    assert boundary_tie(Fake(), costly) == (0.5, 2, 4)
    cheap, _ = extremes(Fake(), 3)
    assert cheap.tolist() == [1, 2, 0] and boundary_tie(Fake(), cheap) is None  # all 3 taken


def test_fp_check_compares_class_lists():
    cfg = C.from_dict({"name": "q"}, [*TINY, "recipe=static", "quant.bits=[3]"])
    fp_cfg = C.from_dict({"name": "fp"}, [*TINY, "recipe=fp"])

    class Info:
        def __init__(self, classes):
            self.classes = classes

    _check_fp_compatible(cfg, Info(["a", "b"]), fp_cfg, Info(["a", "b"]), Path("fp.pt"))
    with pytest.raises(
        C.UserError,
        match=r"--fp run 'fp.pt' has 3 classes \['a', 'b', 'c'\] but this run 2 classes "
        r"\['a', 'b'\]; give an FP run on the same data$",
    ):
        _check_fp_compatible(cfg, Info(["a", "b"]), fp_cfg, Info(["a", "b", "c"]), Path("fp.pt"))


def test_pareto_front_keeps_only_undominated_points():
    points = [(1.0, 90.0), (0.5, 80.0), (0.7, 79.0), (1.2, 89.0), (2.0, 95.0), (0.5, 70.0)]
    assert pareto_front(points) == [(0.5, 80.0), (1.0, 90.0), (2.0, 95.0)]


# --------------------------------------------------------------------------- the report


def test_report_files_and_csv(runs):
    out, paths = runs
    report = out / "dq" / "report"
    for name in ("csv", "md", "html", "json", "usage", "histogram", "gallery", "accuracy"):
        assert paths[name].is_file() and paths[name].parent == report, name
    for png in report.glob("*.png"):
        assert png.read_bytes().startswith(PNG_MAGIC), png

    cfg = C.load(out / "dq" / "config.yaml")
    test_set = build_loaders(cfg.data, cfg.seed, "cpu")[1].data
    header, rows = _rows(paths["csv"])
    dynamic = ["layer2.0.0", "layer2.1.0", "layer3.0.0", "layer3.1.0"]
    assert header == [
        "index",
        "label",
        "prediction",
        "correct",
        "bitops",
        "bitops_rel",
        "loss",
        "confidence",
        "entropy",
        "fp_loss",
        "fp_confidence",
        *[f"bits:{n}" for n in dynamic],
    ]
    assert len(rows) == len(test_set) == 128
    assert [int(r["label"]) for r in rows] == test_set.labels.tolist()
    # The CSV's BitOPs and accuracy agree with what training recorded for last.pt.
    recorded = json.loads((out / "dq" / "summary.json").read_text())["runs"][0]
    bitops = torch.tensor([float(r["bitops"]) for r in rows], dtype=torch.float64)
    assert float(bitops.mean()) == pytest.approx(recorded["bitops_mean"], rel=1e-12)
    correct = sum(int(r["correct"]) for r in rows)
    assert 100 * correct / len(rows) == pytest.approx(recorded["top1"])
    assert all(int(r[f"bits:{n}"]) in (2, 3, 4) for r in rows for n in dynamic)


def test_gallery_cheapest_cost_no_more_than_most_expensive(runs):
    out, paths = runs
    _, rows = _rows(paths["csv"])
    cost = [float(r["bitops"]) for r in rows]
    gallery = json.loads(paths["json"].read_text())["gallery"]
    cheap, costly = gallery["cheapest"], gallery["most_expensive"]
    assert len(cheap) == len(costly) == 8
    assert max(cost[i] for i in cheap) <= min(cost[i] for i in costly)
    assert cost[cheap[0]] == min(cost) and cost[costly[0]] == max(cost)


def test_html_is_self_contained_and_embeds_every_plot(runs):
    out, paths = runs
    parser = _Images()
    parser.feed(paths["html"].read_text())
    pngs = sorted((out / "dq" / "report").glob("*.png"))
    assert len(parser.srcs) == len(pngs) == 5
    prefix = "data:image/png;base64,"
    embedded = set()
    for src in parser.srcs:
        assert src.startswith(prefix), src[:40]
        data = base64.b64decode(src[len(prefix) :], validate=True)
        assert data.startswith(PNG_MAGIC)
        embedded.add(data)
    assert embedded == {p.read_bytes() for p in pngs}


def test_report_text_names_difficulty_and_bitops_convention(runs):
    _, paths = runs
    md = paths["md"].read_text()
    data = json.loads(paths["json"].read_text())
    assert data["difficulty"] == "full-precision loss"
    assert set(data["spearman"]) == {"fp_loss", "entropy"}
    assert f"ρ = {data['spearman']['fp_loss']:+.3f}" in md
    assert "full-precision layers are not counted" in md
    assert sum(q["n"] for q in data["accuracy_by_quantile"]) == data["samples"] == 128


def test_static_run_gives_a_reduced_report(runs):
    out, _ = runs
    paths = write_report(out / "static3")
    assert "usage" not in paths and "difficulty" not in paths
    data = json.loads(paths["json"].read_text())
    assert data["difficulty"] == "predictive entropy" and data["spearman"]["entropy"] is None
    assert [q["bin"] for q in data["accuracy_by_quantile"]] == ["all"]
    _, rows = _rows(paths["csv"])
    assert len({r["bitops"] for r in rows}) == 1 and len(rows) == 128
    # Every image costs the same: no cheapest or most expensive images to rank.
    assert "gallery" not in paths and not (out / "static3" / "report" / "gallery.png").exists()
    assert data["gallery"] == {"cheapest": [], "most_expensive": [], "tie_break": None}
    rel = float(rows[0]["bitops_rel"])
    assert (
        f"Every test image costs the same ({float(rows[0]['bitops']):.4g} BitOPs, {rel:.3f}x), "
        "so there are no cheapest or most expensive images to show."
    ) in paths["md"].read_text()


def test_cli_report_and_its_errors(runs, capsys):
    out, _ = runs
    assert main(["report", str(out / "dq"), "--fp", str(out / "fp")]) == 0
    assert "report.html" in capsys.readouterr().out
    cases = [
        (["report", str(out / "fp")], "is a full-precision run"),
        (["report", str(out / "nothing")], "not found"),
        (["report", str(out / "dq"), "--fp", str(out / "static3")], "is a 'static' run"),
        (["report", str(out / "dq"), "--fp", str(out / "missing")], "not found"),
    ]
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("instaquant: error:") and message in err
        assert len(err.splitlines()) == 1


def test_demo_writes_the_dq_report(runs, tmp_path, monkeypatch, capsys):
    from instaquant import demo

    src, _ = runs
    for name in ("fp", "dq"):
        shutil.copytree(src / name, tmp_path / name, ignore=shutil.ignore_patterns("report"))
    # Reuse the trained tiny runs instead of training the demo's: this checks the wiring only.
    configs = [C.from_dict({"name": n, "out": str(tmp_path / n)}, TINY) for n in ("fp", "dq")]
    monkeypatch.setattr(demo, "demo_configs", lambda out: configs)
    monkeypatch.setattr(
        demo,
        "fit",
        lambda cfg, **kw: json.loads((tmp_path / cfg.name / "summary.json").read_text())["runs"][0],
    )
    demo.run_demo(tmp_path, progress=False)
    html = tmp_path / "dq" / "report" / "report.html"
    assert html.is_file() and str(html) in capsys.readouterr().out
    data = json.loads((tmp_path / "dq" / "report" / "report.json").read_text())
    assert data["fp_run"] == str(tmp_path / "fp" / "last.pt")


@pytest.mark.parametrize("progress", [True, False])
def test_analysis_evaluations_follow_the_progress_flag(runs, monkeypatch, progress):
    """Both evaluations of a report (the run, then the FP run) get a bar unless told not to."""
    from instaquant import analysis, evaluation

    seen = []
    real = evaluation.tqdm

    def recording_tqdm(*args, **kwargs):
        seen.append(kwargs.get("disable"))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "tqdm", recording_tqdm)
    out, _ = runs
    analysis.analyze(out / "dq", out / "fp", progress=progress)
    assert seen == ([None, None] if progress else [True, True])


def test_gallery_breaks_cost_ties_by_fp_loss_and_says_so(runs):
    _, paths = runs
    _, rows = _rows(paths["csv"])
    cost = [float(r["bitops"]) for r in rows]
    loss = [float(r["fp_loss"]) for r in rows]
    gallery = json.loads(paths["json"].read_text())["gallery"]
    md = paths["md"].read_text()
    rule = (
        "Ordered by BitOPs; images of equal BitOPs are taken easiest first for the cheapest "
        "and hardest first for the most expensive (by full-precision loss), then by test-set index "
        "(ascending for the cheapest, descending for the most expensive)."
    )
    assert rule in md and gallery["tie_break"] in rule
    ties = 0
    for what, chosen, sign in (("cheapest", gallery["cheapest"], 1), ("most expensive", gallery["most_expensive"], -1)):  # fmt: skip
        keys = [(sign * cost[i], sign * loss[i]) for i in chosen]
        assert keys == sorted(keys)  # by cost, then by FP loss within a cost
        edge = cost[chosen[-1]]
        tied = [i for i in range(len(rows)) if cost[i] == edge]
        taken = [i for i in chosen if cost[i] == edge]
        left = [i for i in tied if i not in chosen]
        # Within the boundary cost the easiest (cheapest) / hardest (most expensive) were taken.
        assert all(sign * loss[i] <= sign * loss[j] for i in taken for j in left)
        note = (
            f"The {what} {len(chosen)} take {len(taken)} of the {len(tied)} images that cost "
            f"{float(rows[chosen[-1]]['bitops_rel']):.3f}x."
        )
        assert (note in md) == bool(left)
        ties += bool(left)
    assert ties == 2  # this tiny run cuts through a tie at both ends: the rule was needed


def test_failed_report_keeps_the_previous_one(runs, tmp_path, monkeypatch):
    out, _ = runs
    dq = tmp_path / "dq"
    shutil.copytree(out / "dq", dq)
    before = {p.name: p.read_bytes() for p in (dq / "report").iterdir()}
    assert len(before) == 9

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "plot_bitops_histogram", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report(dq, fp_run=out / "fp", progress=False)
    assert {p.name: p.read_bytes() for p in (dq / "report").iterdir()} == before
    files = ["best.pt", "config.yaml", "last.pt", "metrics.jsonl", "report", "summary.json"]
    assert sorted(p.name for p in dq.iterdir()) == files  # no half-built folder left behind

    monkeypatch.undo()
    (dq / "report" / "stale.png").write_bytes(PNG_MAGIC)
    paths = write_report(dq, fp_run=out / "fp", progress=False)
    assert paths["html"] == dq / "report" / "report.html" and paths["html"].is_file()
    assert sorted(p.name for p in (dq / "report").iterdir()) == sorted(before)  # stale.png gone
    assert sorted(p.name for p in dq.iterdir()) == files


def test_nan_fp_run_is_a_one_line_error(runs, tmp_path, capsys):
    out, _ = runs
    for name in ("dq", "fp"):
        shutil.copytree(out / name, tmp_path / name)
    ckpt_path = tmp_path / "fp" / "last.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    for v in ckpt["model"].values():
        if v.is_floating_point():
            v.fill_(math.nan)
    torch.save(ckpt, ckpt_path)
    before = (tmp_path / "dq" / "report" / "report.md").read_bytes()
    assert main(["report", str(tmp_path / "dq"), "--fp", str(tmp_path / "fp")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"instaquant: error: --fp run {str(ckpt_path)!r} gives a NaN loss or confidence on "
        "128 of 128 test images (diverged weights?); give a trained FP run"
    )
    assert (tmp_path / "dq" / "report" / "report.md").read_bytes() == before


def _copy_runs(src: Path, dst: Path, *names: str) -> None:
    for name in names:
        shutil.copytree(src / name, dst / name, ignore=shutil.ignore_patterns("report"))


def test_run_without_summary_is_in_its_own_comparison(runs, tmp_path):
    out, _ = runs
    _copy_runs(out, tmp_path, "dq")
    # A time-sliced run (--stop-after-epoch) has its checkpoints but no summary.json yet.
    shutil.copytree(out / "static3", tmp_path / "sliced", ignore=shutil.ignore_patterns("report", "summary.json"))  # fmt: skip
    paths = write_report(tmp_path / "sliced", progress=False)
    data = json.loads(paths["json"].read_text())
    assert [(r["name"], r["recipe"]) for r in data["comparison"]] == [
        ("static3", "static"),
        ("dq", "dynamic"),
    ]
    own = data["comparison"][0]
    assert own["top1"] == data["metrics"]["top1"] and own["bitops_rel"] == 1.0
    assert "This run (circled): its analysed checkpoint last.pt" in paths["md"].read_text()


def test_comparison_fp_line_is_the_analysed_fp_model(runs, tmp_path, capsys):
    out, _ = runs
    _copy_runs(out, tmp_path, "fp", "dq", "static3")
    # summary.json figures the report must not use for the FP line.
    summary = tmp_path / "fp" / "summary.json"
    data = json.loads(summary.read_text())
    data["runs"][0].update(top1=12.5, best_top1=12.5)
    summary.write_text(json.dumps(data))
    paths = write_report(tmp_path / "dq", fp_run=tmp_path / "fp", checkpoint="best", progress=False)
    data = json.loads(paths["json"].read_text())
    assert main(["eval", str(tmp_path / "fp" / "best.pt"), "--json"]) == 0
    fp_top1 = json.loads(capsys.readouterr().out)["top1"]
    static3 = json.loads((tmp_path / "static3" / "summary.json").read_text())["runs"][0]
    assert [(r["name"], r["recipe"], r["top1"]) for r in data["comparison"]] == [
        ("dq", "dynamic", data["metrics"]["top1"]),
        ("fp", "fp", fp_top1),
        ("static3", "static", static3["top1"]),  # its final checkpoint, as the caption says
    ]
    assert data["fp_top1"] == fp_top1
    assert (
        "This run (circled): its analysed checkpoint best.pt; full-precision line: the FP run "
        f"{tmp_path / 'fp' / 'best.pt'} on these same 128 test images; the other runs: finished "
        "runs beside this one on the same model and data, at their final checkpoint as their "
        "summary.json records it."
    ) in paths["md"].read_text()


# --------------------------------------------------------------------------- image folders


@pytest.fixture(scope="module")
def folder_runs(tmp_path_factory):
    """Static and FP runs on two image folders: A (cat, dog) and B (bird, cat, dog)."""
    base = tmp_path_factory.mktemp("folders")
    roots = {
        "A": make_image_folder(base / "A", classes=("cat", "dog"), per_class=4, size=8),
        "B": make_image_folder(base / "B", classes=("bird", "cat", "dog"), per_class=4, size=8),
    }
    for name, recipe in (("fpA", "fp"), ("fpB", "fp"), ("stA", "static"), ("stB", "static")):
        data = [
            "data.name=imagefolder",
            f"data.root={roots[name[-1]]}",
            f"data.cache_dir={base / 'cache'}",
            "data.batch_size=4",
        ]
        extra = [f"recipe={recipe}", "quant.bits=[3]", "epochs=1", "model.name=digits_net"]
        cfg = C.from_dict({"name": name, "out": str(base / "runs" / name)}, [*data, *extra])
        fit(cfg, progress=False)
    return base / "runs", roots


def test_fp_run_on_another_image_folder_is_refused(folder_runs, capsys):
    runs, roots = folder_runs
    assert main(["report", str(runs / "stA"), "--fp", str(runs / "fpB")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"instaquant: error: --fp run {str(runs / 'fpB' / 'last.pt')!r} was trained on "
        f"imagefolder {str(roots['B'])!r} but this run on imagefolder {str(roots['A'])!r}; "
        "give an FP run on the same data"
    )


def test_comparison_leaves_out_runs_on_another_image_folder(folder_runs):
    runs, roots = folder_runs
    paths = write_report(runs / "stA", progress=False)
    data = json.loads(paths["json"].read_text())
    # stB and fpB (same model, dataset name "imagefolder", but folder B) are left out.
    assert [r["name"] for r in data["comparison"]] == ["stA", "fpA"]
    assert f"(digits_net on imagefolder {roots['A']})" in paths["md"].read_text()


def test_comparison_keeps_neighbours_when_the_folder_was_moved(folder_runs, tmp_path):
    """``data.root=`` pointing at a moved copy applies to the analysed run; its neighbours'
    configs still name the old place, which is the place this run was trained on."""
    runs, roots = folder_runs
    moved = tmp_path / "A_moved"
    shutil.copytree(roots["A"], moved)
    work = tmp_path / "runs"
    shutil.copytree(runs, work)
    paths = write_report(work / "stA", overrides=[f"data.root={moved}"], progress=False)
    data = json.loads(paths["json"].read_text())
    assert [r["name"] for r in data["comparison"]] == ["stA", "fpA"]


def test_dq_report_gives_the_headroom_and_summary_agrees(runs):
    out, paths = runs
    data = json.loads(paths["json"].read_text())
    room = data["headroom"]
    # The report measures last.pt as training's end did: the same figures as summary.json.
    recorded = json.loads((out / "dq" / "summary.json").read_text())["runs"][0]["headroom"]
    keys = ("uniform_top1", "oracle_top1", "monotone_oracle_top1", "controller_top1")
    for key in (*keys, "layer_policy_top1", "layer_policy_bitops_rel"):
        assert room[key] == pytest.approx(recorded[key]), key
    assert room["controller_top1"] == pytest.approx(data["metrics"]["top1"])
    assert room["oracle_top1"] >= max(room["uniform_top1"]) >= room["monotone_oracle_top1"] - 1e-9
    assert sum(room["oracle_share"].values()) == pytest.approx(1.0)
    _, rows = _rows(paths["csv"])
    fp_loss = torch.tensor([float(r["fp_loss"]) for r in rows], dtype=torch.float64)
    bitops = torch.tensor([float(r["bitops"]) for r in rows], dtype=torch.float64)
    expected = spearman(bitops, fp_loss)
    assert room["rho_fp_loss"] == pytest.approx(expected, abs=1e-6) or math.isnan(expected)
    md = paths["md"].read_text()
    assert "## How much could per-image bits buy?" in md and "monotone oracle" in md
    assert f"| {room['layer_policy_top1']:.2f} | {room['layer_policy_bitops_rel']:.3f}x |" in md
    assert set(room["ranked_top1"]) == {"monotone_oracle", "fp_loss", "cheapest_confidence"}
    assert room["ranked_top1"]["fp_loss"] == recorded["ranked_top1"]["fp_loss"]
    fp_rank = room["ranked_top1"]["fp_loss"]
    assert f"the full-precision loss {fp_rank['top1']:.2f}%" in md
    cascade = room["cascade"]  # at the controller's BitOPs, the best pair
    assert (
        cascade == recorded["cascade"]
        and cascade["bitops_rel"] <= room["controller_bitops_rel"] + 1e-9
    )
    cheap, dear = cascade["bits"]
    assert f"every image at {cheap}-bit" in md and f"| {cascade['top1']:.2f} |" in md
    static = json.loads(write_report(out / "static3")["json"].read_text())
    assert static["headroom"] is None  # one bit-width: nothing to choose between
