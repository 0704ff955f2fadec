"""Checkpoints: plain types only, written atomically, loaded with ``weights_only=True``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

FORMAT = "instaquant-checkpoint"
VERSION = 1


class CheckpointError(UserError):
    pass


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a torn one.
    ``obj`` is saved with ``torch.save``; a ``str`` is written as UTF-8 text.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, default_file_mode())  # mkstemp's 0600 would hide results from other users
        with os.fdopen(fd, "wb") as f:
            if isinstance(obj, str):
                f.write(obj.encode("utf-8"))
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | Path, **fields: Any) -> None:
    atomic_save({"format": FORMAT, "version": VERSION, **fields}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, unsafe types...
        raise CheckpointError(
            f"checkpoint {str(path)!r} is unreadable or corrupted ({type(err).__name__}); "
            "use an earlier checkpoint (best.pt / last.pt)"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an instaquant checkpoint")
    version = ckpt.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(
            f"{str(path)!r} has format version {version!r}; this instaquant reads versions up "
            f"to {VERSION} (upgrade instaquant)"
        )
    return ckpt


def default_file_mode() -> int:
    """The mode a plain ``open`` would give a new file: 0o666 less the process's umask
    (reading the umask means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def load_model_state(model: torch.nn.Module, state: dict[str, Any], source: str) -> None:
    """``model.load_state_dict(state)``, or a one-line error saying which entries differ."""
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise CheckpointError(
            f"{source} does not fit the configured model: {_mismatch(model.state_dict(), state)}"
        ) from None


def _mismatch(own: dict[str, Any], state: dict[str, Any]) -> str:
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
        for k in own
        if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape
    ]
    signed = [
        k.rsplit(".", 1)[0]
        for k in own
        if k.endswith(".signed_input") and k in state and bool(state[k]) != bool(own[k])
    ]
    parts = []
    if signed:
        parts.append(
            f"{len(signed)} activation quantizers signed in one and unsigned in the other "
            f"({some(signed)})"
        )
    if missing:
        parts.append(f"{len(missing)} entries missing ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({some(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape ({some(shapes)})")
    return "; ".join(parts) or "the entries do not load"
