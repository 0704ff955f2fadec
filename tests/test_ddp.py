"""DDP on gloo with 2 CPU processes: test sharding, evaluation, stop signals, resume."""

import json
import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers import as_rank, finishing, free_port, make_image_folder
from instaquant import config as C
from instaquant import distributed, engine
from instaquant.builder import build_model
from instaquant.checkpoint import load_checkpoint
from instaquant.config import DataConfig, UserError
from instaquant.data import build_loaders
from instaquant.evaluation import evaluate

# 160 digits: 80 per rank, 2 steps of 32 (5 steps in one process).
ARGS = [
    "data.name=digits",
    "data.limit=160",
    "data.batch_size=32",
    "model.name=digits_net",
    "device=cpu",
    "recipe=dynamic",
    "quant.method=pact",
    "quant.bits=[2, 3, 4]",
    "budget.target_bits=3",
    "optim.lr=0.02",
    "epochs=1",
]


def _cfg(out):
    return C.from_dict({"name": Path(out).name, "out": str(out)}, ARGS)


def _join(rank, world, port):
    """Join the gloo group with a short timeout, so a rank left waiting fails the test instead
    of hanging it; train_model uses this group and leaves it at its end."""
    as_rank(rank, world, port)
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))


def _spawn(worker, *args, phases=1):
    ports = [free_port() for _ in range(phases)]
    torch.multiprocessing.spawn(finishing, args=(worker, 2, ports, *args), nprocs=2)


def _rows(out):
    return [json.loads(r) for r in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- evaluation


def test_streamed_test_split_gives_each_image_to_one_rank(tmp_path):
    """5 test images over 2 ranks: 3 + 2, none repeated (a padding sampler gave 3 + 3)."""
    root = make_image_folder(tmp_path / "img", classes=tuple("abcde"), per_class=1)
    cfg = DataConfig(name="imagefolder", root=str(root), cache="no", workers=0)
    shards = [build_loaders(cfg, 0, "cpu", rank, 2)[1] for rank in (0, 1)]
    labels = [torch.cat([y for _, y in shard]).tolist() for shard in shards]
    assert labels == [[0, 2, 4], [1, 3]]


def _empty_shard_worker(rank, world, ports, dump):
    _join(rank, world, ports[0])
    ctx = distributed.setup("cpu")
    cfg = _cfg(dump)
    _, test, info = build_loaders(cfg.data, 0, "cpu", rank, world)
    test.data = test.data.subset(1, seed=1)  # one test image: rank 1's shard is empty
    torch.manual_seed(0)
    model = build_model(cfg, info, "cpu")
    metrics = evaluate(model, test, cfg.ref_bits, ctx=ctx).metrics
    (Path(dump) / f"rank{rank}.json").write_text(json.dumps(metrics))
    distributed.teardown(ctx)


def test_evaluate_with_an_empty_shard_matches_one_process(tmp_path):
    _spawn(_empty_shard_worker, str(tmp_path))
    cfg = _cfg(tmp_path)
    _, test, info = build_loaders(cfg.data, 0, "cpu")
    test.data = test.data.subset(1, seed=1)
    torch.manual_seed(0)
    single = evaluate(build_model(cfg, info, "cpu"), test, cfg.ref_bits).metrics
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert single["samples"] == 1 and "candidate_fraction" in single
    # Ranks run one thread each, this process two: float sums may round differently.
    for r in ranks:
        assert r.pop("loss") == pytest.approx(single["loss"], rel=1e-6)
    assert ranks == [{k: v for k, v in single.items() if k != "loss"}] * 2


# ---------------------------------------------------------------------------- stop and resume


def _stop_worker(rank, world, ports, tmp):
    tmp, found = Path(tmp), {}
    _join(rank, world, ports[0])
    found["best"] = engine.fit(_cfg(tmp / "straight"), progress=False)["best_top1"]
    step = engine._EpochLoop._step

    def step_then_sigterm(self, x, y, i):
        step(self, x, y, i)
        if rank == 1 and i == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # rank 0 never sees a signal

    engine._EpochLoop._step = step_then_sigterm
    _join(rank, world, ports[1])
    try:
        engine.fit(_cfg(tmp / "stopped"), progress=False)
    except engine.RunInterruptedError as err:
        found["stopped"] = str(err).split(" in ")[0]
        if rank == 0:  # the checkpoint is written before rank 0 raises
            found["saved_step"] = load_checkpoint(tmp / "stopped" / "last.pt")["step"]
    engine._EpochLoop._step = step
    _join(rank, world, ports[2])
    entry, model = engine.train_model(_cfg(tmp / "stopped"), progress=False, resume=True)
    found["resumed_best"] = entry["best_top1"]
    torch.save(model.state_dict(), tmp / f"rank{rank}.pt")
    (tmp / f"rank{rank}.json").write_text(json.dumps(found))


def test_stop_signal_on_one_rank_stops_all_and_resumes_exactly(tmp_path):
    """SIGTERM reaching rank 1 alone stops both ranks at the same step with a checkpoint; the
    resumed epoch's train metrics cover the whole epoch; every rank returns the best top-1."""
    _spawn(_stop_worker, str(tmp_path), phases=3)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    stopped = "SIGTERM: saved a resumable checkpoint at epoch 1, step 1/2"
    assert [r["stopped"] for r in ranks] == [stopped, stopped]
    assert ranks[0]["saved_step"] == 1
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert straight["best_top1"] > 0 and resumed["world"] == 2
    assert [(r["best"], r["resumed_best"]) for r in ranks] == [(straight["best_top1"],) * 2] * 2
    [a], [b] = _rows(tmp_path / "straight"), _rows(tmp_path / "stopped")
    assert b["train_samples"] == 128
    for key in ("train_samples", "train_loss", "train_top1", "train_budget_loss", "test_top1"):
        assert a[key] == b[key], key
    for r in (0, 1):
        state = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for k, v in straight["model"].items():
            assert torch.equal(state[k], v), (r, k)


def _resume_worker(rank, world, ports, tmp):
    tmp, found = Path(tmp), {}
    _join(rank, world, ports[0])
    _, model = engine.train_model(_cfg(tmp / "unstarted"), progress=False, resume=True)
    torch.save(model.state_dict(), tmp / f"rank{rank}.pt")
    _join(rank, world, ports[1])
    try:
        engine.fit(_cfg(tmp / "mid"), progress=False, resume=True)
    except UserError as err:
        found["error"] = str(err)
    (tmp / f"rank{rank}.json").write_text(json.dumps(found))


def test_two_processes_resume_a_one_process_run_only_at_an_epoch_boundary(tmp_path, monkeypatch):
    """Stopped before its first step (quantizers not initialised): resumed by 2 ranks, which
    initialise them identically. Stopped mid-epoch: refused, the steps to skip would be wrong."""
    run, step = engine._EpochLoop.run, engine._EpochLoop._step

    def stop_before_first_step(self, *args):
        self.stop.received = "SIGTERM"
        return run(self, *args)

    def stop_after_first_step(self, x, y, i):
        step(self, x, y, i)
        self.stop.received = "SIGTERM"

    for name, attr, patch in (
        ("unstarted", "run", stop_before_first_step),
        ("mid", "_step", stop_after_first_step),
    ):
        monkeypatch.setattr(engine._EpochLoop, attr, patch)
        with pytest.raises(engine.RunInterruptedError):
            engine.fit(_cfg(tmp_path / name), progress=False)
        monkeypatch.undo()
    unstarted = load_checkpoint(tmp_path / "unstarted" / "last.pt")["model"]
    flags = [k for k in unstarted if k.endswith("initialized")]
    assert flags and not any(unstarted[k].any() for k in flags)

    _spawn(_resume_worker, str(tmp_path), phases=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(a[k].all() for k in flags)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    last = str(tmp_path / "mid" / "last.pt")
    error = (
        f"{last!r} was stopped mid-epoch by 1 process(es), this run has 2: resume it with 1; "
        "the count may change only between epochs (train with --stop-after-epoch to stop at "
        "an epoch's end)"
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"error": error}, {"error": error}]


def _noise_worker(rank, world, ports, tmp):
    tmp = Path(tmp)
    _join(rank, world, ports[0])
    step, drawn = engine._EpochLoop._step, {}

    def recording_step(self, x, y, i):
        if i == 0:  # the stream Gumbel noise and dropout draw from, at the first step
            drawn["noise"] = torch.rand(8).tolist()
        step(self, x, y, i)

    engine._EpochLoop._step = recording_step
    try:
        engine.fit(_cfg(tmp / "noise"), progress=False)
    finally:
        engine._EpochLoop._step = step
    (tmp / f"noise{rank}.json").write_text(json.dumps(drawn))


def test_ranks_draw_their_own_noise_rank_0_that_of_one_process(tmp_path):
    _spawn(_noise_worker, str(tmp_path))
    rank0, rank1 = (json.loads((tmp_path / f"noise{r}.json").read_text())["noise"] for r in (0, 1))
    assert rank0 != rank1
    torch.manual_seed(0)  # seed 0, epoch 0: what one process seeds the first epoch with
    assert rank0 == torch.rand(8).tolist()


def test_ranks_augment_with_their_own_stream():
    from instaquant.data import DatasetInfo, TensorData, TensorLoader

    # Every image the same: the shards hold equal images, so only the crops can differ.
    data = TensorData(torch.rand(1, 3, 8, 8).repeat(64, 1, 1, 1), torch.zeros(64, dtype=torch.long))
    info = DatasetInfo("cifar10", 10, 3, 8, (0.5,) * 3, (0.25,) * 3, [])

    def first_batch(rank, world):
        loader = TensorLoader(data, info, 16, train=True, rank=rank, world=world)
        return next(iter(loader))[0]

    assert not torch.equal(first_batch(0, 2), first_batch(1, 2))
    assert torch.equal(first_batch(0, 2), first_batch(0, 1)[:16])  # rank 0: one process's crops
