"""Checkpoints: atomic writes, safe loads (``weights_only=True``), and resuming a run.

A checkpoint is untrusted input: it is loaded with ``torch.load(weights_only=True)``, which refuses to run pickled
code. A file that needs full unpickling is refused with a message unless the caller passes ``trust=True``
(the scripts' ``--trust_checkpoint`` flag).
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from utils.runtime.errors import CheckpointError, UnsafeCheckpointError
from utils.runtime.files import fsync_path

#: Plain containers that the official DINO checkpoints hold besides tensors, safe to rebuild without running code.
SAFE_GLOBALS = [argparse.Namespace]


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, flushed to disk, then renamed.

    A reader (or a kill during the save) sees either the previous file or the complete new one, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_path(path.parent)


def load_checkpoint(path: str | os.PathLike, trust: bool = False, map_location: str = "cpu") -> Any:
    """Load a checkpoint safely. Raises :class:`CheckpointError` with a one-line explanation when the file is
    missing, truncated or corrupt, or needs pickle (unless ``trust=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path} holds Python objects that only full unpickling can load, which may run arbitrary code; "
            "refusing it. If you trust this file, pass --trust_checkpoint"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({str(exc).splitlines()[0]})") from exc


def restore_state(checkpoint: dict, run_variables: dict | None = None, **objects: Any) -> None:
    """Every keyword object gets ``load_state_dict(checkpoint[key])`` (None objects are skipped), and every key of
    ``run_variables`` present in the checkpoint is copied into it."""
    for key, obj in objects.items():
        if obj is None:
            continue
        if key not in checkpoint:
            raise CheckpointError(f"the checkpoint has no {key!r} entry (it has: {', '.join(sorted(checkpoint))})")
        obj.load_state_dict(checkpoint[key])
    if run_variables is not None:
        for key in run_variables:
            if key in checkpoint:
                run_variables[key] = checkpoint[key]


def restart_from_checkpoint(path: str | os.PathLike, run_variables: dict | None = None, **objects: Any) -> bool:
    """Resume from ``path`` if it exists (see :func:`restore_state`). Returns whether a checkpoint was found."""
    path = Path(path)
    if not path.is_file():
        return False
    restore_state(load_checkpoint(path), run_variables, **objects)
    return True


def resume_candidates(output_dir: str | os.PathLike, name: str = "checkpoint.pth") -> list[Path]:
    """``checkpoint.pth`` then the periodic ``checkpointNNNN.pth`` files, newest first."""
    folder = Path(output_dir)
    periodic = sorted(folder.glob(f"{Path(name).stem}[0-9][0-9][0-9][0-9].pth"), reverse=True)
    return [p for p in [folder / name, *periodic] if p.is_file()]


def load_latest_checkpoint(output_dir: str | os.PathLike, warn=print) -> tuple[Path, Any] | None:
    """The newest checkpoint of ``output_dir`` that loads; a truncated or corrupt one is reported and skipped.
    An unsafe one (pickled code) is an error: a run must not silently start over beside it."""
    for path in resume_candidates(output_dir):
        try:
            return path, load_checkpoint(path)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as exc:
            warn(f"warning: skipping {exc}")
    return None
