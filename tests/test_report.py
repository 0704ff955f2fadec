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

from instaquant import config as C
from instaquant.analysis import extremes, quantile_bins, rankdata, spearman
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
        n = 6

    cheap, costly = extremes(Fake(), 2)
    assert cheap.tolist() == [1, 2] and costly.tolist() == [4, 0]
    cheap, costly = extremes(Fake(), 10)  # clipped to n // 2 so the sets never overlap
    assert len(cheap) == len(costly) == 3 and not set(cheap.tolist()) & set(costly.tolist())


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
