import os

import pytest

from utils.runtime import files
from utils.runtime.files import fsync_path


def test_fsync_path_syncs_files_and_folders_and_reports_a_missing_file(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(os.fstat(fd).st_ino) or real_fsync(fd))
    (tmp_path / "f").write_bytes(b"x")
    fsync_path(tmp_path / "f")
    fsync_path(tmp_path)
    assert synced == [(tmp_path / "f").stat().st_ino, tmp_path.stat().st_ino]
    with pytest.raises(FileNotFoundError):
        fsync_path(tmp_path / "missing")
