"""Resume, interruption, corrupted checkpoints, non-finite losses, bad input, DDP on gloo."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import as_rank, finishing, free_port
from instaquant import config as C
from instaquant import distributed
from instaquant.builder import load_for_eval
from instaquant.checkpoint import CheckpointError, atomic_save, load_checkpoint
from instaquant.cli import main
from instaquant.engine import NonFiniteLossError, fit, train_model
from instaquant.evaluation import evaluate

EMPTY = Path(__file__).parent / "empty_config.yaml"  # every key from the command line
# On the CPU: exact resume and identical ranks assume deterministic CPU kernels.
TINY = [
    "data.name=digits",
    "data.limit=160",
    "data.batch_size=32",
    "model.name=digits_net",
    "device=cpu",
]
DQ = ["recipe=dynamic", "quant.bits=[2, 3, 4]", "budget.target_bits=3", "optim.lr=0.02"]


def _cfg(out, *extra):
    return C.from_dict({"name": Path(out).name, "out": str(out)}, [*TINY, *DQ, *extra])


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_between_epochs_is_exact(tmp_path):
    fit(_cfg(tmp_path / "straight", "epochs=3"), progress=False)
    fit(_cfg(tmp_path / "stopped", "epochs=3"), progress=False, stop_after_epoch=1)
    assert load_checkpoint(tmp_path / "stopped" / "last.pt")["epoch"] == 1
    assert not (tmp_path / "stopped" / "summary.json").exists()
    fit(_cfg(tmp_path / "stopped", "epochs=3"), progress=False, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "stopped" / "last.pt")
    _same_state(a["model"], b["model"])
    for key in ("train_loss", "test_top1", "test_bitops_mean"):
        assert a["metrics"][key] == b["metrics"][key], key
    rows = (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3]


def test_resume_mid_epoch_is_exact(tmp_path, monkeypatch):
    """A stop in the middle of an epoch resumes with the same Gumbel noise and the epoch's
    running statistics, so the run ends exactly where the uninterrupted one does."""
    from instaquant import engine

    fit(_cfg(tmp_path / "straight", "epochs=2"), progress=False)
    step = engine._EpochLoop._step

    def step_then_sigterm(self, x, y, i):
        step(self, x, y, i)
        if self.epoch == 1 and i == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop stops before step 3

    monkeypatch.setattr(engine._EpochLoop, "_step", step_then_sigterm)
    with pytest.raises(engine.RunInterruptedError, match="epoch 2, step 3/5"):
        fit(_cfg(tmp_path / "stopped", "epochs=2"), progress=False)
    monkeypatch.undo()
    fit(_cfg(tmp_path / "stopped", "epochs=2"), progress=False, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "stopped" / "last.pt")
    _same_state(a["model"], b["model"])
    for key in ("train_loss", "train_top1", "train_samples", "train_budget_loss", "test_top1"):
        assert a["metrics"][key] == b["metrics"][key], key


def test_second_stop_signal_interrupts_at_once(capsys):
    """The first signal only sets the flag the training loop checks; work that checks none
    (an image-folder decode) is left by sending it again."""
    from instaquant import engine

    previous = signal.getsignal(signal.SIGINT)
    with engine._StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.received == "SIGINT"
        assert "send it again to stop at once" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt, match="second stop signal"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is previous


def test_torn_last_metrics_row_does_not_block_resume(tmp_path):
    fit(_cfg(tmp_path / "r", "epochs=2"), progress=False, stop_after_epoch=1)
    rows = tmp_path / "r" / "metrics.jsonl"
    whole = rows.read_text()
    rows.write_text(whole + whole[:40])  # a kill while the next row was appended
    fit(_cfg(tmp_path / "r", "epochs=2"), progress=False, resume=True)
    assert [json.loads(r)["epoch"] for r in rows.read_text().splitlines()] == [1, 2]


def test_resume_with_another_architecture_names_the_difference(tmp_path):
    fit(_cfg(tmp_path / "r", "epochs=2"), progress=False, stop_after_epoch=1)
    with pytest.raises(CheckpointError) as info:
        fit(_cfg(tmp_path / "r", "epochs=2", "quant.hidden=8"), progress=False, resume=True)
    message = str(info.value)
    assert "does not fit the configured model" in message and "controller" in message
    assert "of another shape" in message and "\n" not in message


def _launch(out, *extra):
    cmd = [
        sys.executable,
        "-m",
        "instaquant",
        "train",
        "-c",
        str(EMPTY),
        f"out={out}",
        *TINY[:1],
        "data.batch_size=8",
        "model.name=digits_net",
        *DQ,
        *extra,
        "--no-progress",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def test_sigterm_saves_a_resumable_checkpoint_mid_epoch(tmp_path):
    out = tmp_path / "run"
    proc = _launch(out, "epochs=2")
    _wait_for(out / "config.yaml", proc)
    time.sleep(3.0)  # into the first epoch (on a loaded machine perhaps still before step 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGTERM: saved a resumable checkpoint" in err and "Traceback" not in err
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 0 and state["step"] >= 0
    done = _launch(out, "epochs=2", "--resume")
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert load_checkpoint(out / "last.pt")["epoch"] == 2
    assert json.loads((out / "summary.json").read_text())["runs"][0]["epochs"] == 2


def test_sigkill_resumes_from_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = _launch(out, "epochs=3", "data.limit=400")
    _wait_for(out / "last.pt", proc)
    proc.kill()
    proc.communicate()
    assert load_checkpoint(out / "last.pt")["epoch"] >= 1
    done = _launch(out, "epochs=3", "data.limit=400", "--resume")
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    rows = [json.loads(r)["epoch"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]


def test_corrupted_checkpoint_is_reported_and_the_previous_one_survives(tmp_path, monkeypatch):
    fit(_cfg(tmp_path / "r", "epochs=1"), progress=False)
    last = tmp_path / "r" / "last.pt"
    good = last.read_bytes()

    def torn_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"x": 1}, last)
    monkeypatch.undo()
    assert last.read_bytes() == good
    assert [p.name for p in last.parent.iterdir() if p.name.endswith(".tmp")] == []
    last.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="unreadable or corrupted") as info:
        load_checkpoint(last)
    assert "\n" not in str(info.value)
    assert load_checkpoint(tmp_path / "r" / "best.pt")["epoch"] == 1


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    fit(_cfg(out, "epochs=2"), progress=False, stop_after_epoch=1)
    with pytest.raises(NonFiniteLossError, match=r"at epoch 2, step \d+"):
        fit(_cfg(out, "epochs=2", "optim.lr=1e30"), progress=False, resume=True)
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


def test_input_that_does_not_fit_the_model(tmp_path, capsys):
    # Torchvision models take RGB; the digits are grayscale.
    args = ["train", "-c", str(EMPTY), *TINY[:3], "model.name=resnet18", f"out={tmp_path / 'o'}"]
    assert main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "takes 3 input channels" in err and len(err.splitlines()) == 1
    # Any other mismatch is caught by a probe forward before training starts.
    from instaquant.builder import _check_input_fits

    with pytest.raises(
        C.UserError, match=r"does not accept the data's images of shape \(1, 8, 8\)"
    ):
        _check_input_fits(torch.nn.Linear(10, 2), torch.zeros(2, 1, 8, 8), "linear")


def test_nan_in_inputs_is_refused(monkeypatch):
    from instaquant import data as D

    real = D.load_digits

    def poisoned():
        train, test, info = real()
        train.images[3, 0, 2, 2] = float("nan")
        return train, test, info

    monkeypatch.setattr(D, "load_digits", poisoned)
    with pytest.raises(D.DataError, match="hold NaN or inf"):
        D.build_loaders(C.DataConfig(name="digits"), 0, "cpu")


def test_infeasible_budget_and_single_candidate(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "-c",
                str(EMPTY),
                *TINY,
                *DQ,
                "budget.target_bits=1",
                f"out={tmp_path / 'a'}",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "infeasible" in capsys.readouterr().err
    entry = fit(_cfg(tmp_path / "one", "quant.bits=[3]", "epochs=1"), progress=False)
    assert entry["bits_mean"] == 3.0 and entry["bitops_rel"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------- DDP


def _ddp_worker(rank, world, port, out, dump):
    as_rank(rank, world, port)
    cfg = _cfg(out, "epochs=2", "recipe=dynamic", "quant.method=lsq")
    _, model = train_model(cfg, progress=False)
    torch.save(model.state_dict(), Path(dump) / f"rank{rank}.pt")


def test_two_process_gloo_run_keeps_ranks_identical(tmp_path):
    out, dump = tmp_path / "ddp", tmp_path / "dump"
    dump.mkdir()
    args = (_ddp_worker, 2, free_port(), str(out), str(dump))
    torch.multiprocessing.spawn(finishing, args=args, nprocs=2)
    a, b = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    _same_state(a, b)
    assert any(k.endswith("aq.step") for k in a), "LSQ steps are initialised from data"
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_samples"] == 2 * (80 // 32) * 32  # both shards of 80, full batches
    cfg, model, extra = load_for_eval(out / "last.pt")
    single = evaluate(model, extra["test_loader"], cfg.ref_bits).metrics
    assert rows[-1]["test_top1"] == single["top1"] and rows[-1]["test_samples"] == single["samples"]
    assert rows[-1]["test_bitops_mean"] == pytest.approx(single["bitops_mean"], rel=1e-12)


class _ExitedError(Exception):
    pass


def test_a_torchrun_rank_ends_without_the_interpreter_teardown(monkeypatch):
    from instaquant import cli

    def exit_now(code):
        raise _ExitedError(code)

    monkeypatch.setattr(distributed.os, "_exit", exit_now)
    monkeypatch.setattr(cli, "main", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as one_process:
        cli.run()  # the usual exit, teardown included
    assert one_process.value.code == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(_ExitedError) as rank:
        cli.run()
    assert rank.value.args == (2,)


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(RuntimeError, match=r"only \d+ GPU\(s\) are visible.*device=cpu"):
        distributed.setup("cuda")


def test_atomic_writes_follow_the_umask(tmp_path):
    """Results written atomically get the usual permissions, not the temporary file's 0600."""
    previous = os.umask(0o022)
    try:
        atomic_save("{}", tmp_path / "summary.json")
        atomic_save({"x": 1}, tmp_path / "last.pt")
    finally:
        os.umask(previous)
    for name in ("summary.json", "last.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
