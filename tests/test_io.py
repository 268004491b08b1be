"""utils/io.py: the project's one atomic write, orphan cleanup, write probes; the writers use it."""
import os
import stat
import time

import numpy as np
import pytest
import torch

from utils import checkpoint, io as css_io
from utils.io import (
    atomic_write,
    atomic_write_text,
    check_writable,
    is_temp_file_name,
    remove_orphan_temp_files,
    temp_path_for,
)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda value: os.umask(value)
    os.umask(saved)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_file_mode_is_what_open_gives(tmp_path, umask, mask, expected):
    umask(mask)
    atomic_write_text(tmp_path / "a.json", "{}")
    with open(tmp_path / "plain.txt", "w") as handle:  # the reference: a plain open()
        handle.write("x")
    assert _mode(tmp_path / "a.json") == expected == _mode(tmp_path / "plain.txt")
    assert (tmp_path / "a.json").read_text() == "{}"


def test_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "results.csv"
    atomic_write_text(path, "one")
    os.chmod(path, 0o640)
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and _mode(path) == 0o640


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "x.bin"
    atomic_write(path, lambda handle: handle.write(b"old"))

    def fail(handle):
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert os.listdir(tmp_path) == ["x.bin"] and path.read_bytes() == b"old"


def test_temp_names_and_creating_folders(tmp_path):
    tmp = temp_path_for(str(tmp_path / "ckpt.pth"))
    name = os.path.basename(tmp)
    assert name.startswith(".ckpt.pth.css-tmp-") and len(name) == len(".ckpt.pth.css-tmp-") + 12
    assert is_temp_file_name(name) and os.path.dirname(tmp) == str(tmp_path)
    atomic_write_text(tmp_path / "new" / "deep" / "f.txt", "x")
    assert (tmp_path / "new" / "deep" / "f.txt").read_text() == "x"


def test_orphan_cleanup_removes_only_the_pattern(tmp_path):
    orphans = [".ckpt.pth.css-tmp-0123456789ab", ".a.json.css-tmp-fedcba987654"]
    kept = [
        "ckpt.pth",
        ".ckpt.pth.css-tmp-xyz",             # not 12 hex digits
        "ckpt.pth.css-tmp-0123456789ab",     # no leading dot
        ".tmp-train-0.npy",                  # another program's (or the old) pattern
        ".ckpt.pth.css-tmp-0123456789abc",   # 13 digits
        ".bashrc",
    ]
    for name in orphans + kept:
        (tmp_path / name).write_text("x")
    (tmp_path / ".dir.css-tmp-0123456789ab").mkdir()  # a folder, not a file
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".b.css-tmp-0123456789ab").write_text("x")  # not recursive
    removed = remove_orphan_temp_files(tmp_path)
    assert removed == sorted(str(tmp_path / name) for name in orphans)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + [".dir.css-tmp-0123456789ab", "sub"])
    assert os.listdir(tmp_path / "sub") == [".b.css-tmp-0123456789ab"]
    assert remove_orphan_temp_files(tmp_path / "missing") == []


def test_orphan_cleanup_spares_recent_files_when_asked(tmp_path):
    old, new = tmp_path / ".a.css-tmp-0123456789ab", tmp_path / ".b.css-tmp-0123456789ab"
    old.write_text("x")
    new.write_text("x")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert remove_orphan_temp_files(tmp_path, min_age_s=600) == [str(old)]
    assert new.exists()


def test_check_writable_creates_the_folder_and_leaves_nothing(tmp_path):
    folder = tmp_path / "checkpoints" / "step"
    assert check_writable(folder, option="--checkpoint") == str(folder)
    assert folder.is_dir() and os.listdir(folder) == []


def test_check_writable_without_creating_probes_the_nearest_existing_folder(tmp_path):
    folder = tmp_path / "results" / "2026"
    assert check_writable(folder, option="--results", create=False) == str(folder)
    assert os.listdir(tmp_path) == []  # nothing created, nothing left
    (tmp_path / "results").write_text("a file")
    with pytest.raises(ValueError, match=r"^--results .*results/2026: cannot create the folder, a "
                                         r"part of the path \(.*results\) is a file"):
        check_writable(folder, option="--results", create=False)


def test_check_writable_on_a_file(tmp_path):
    (tmp_path / "logs").write_text("I am a file")
    with pytest.raises(ValueError, match=r"^--logdir .*logs: this path is a file, not a folder"):
        check_writable(tmp_path / "logs", option="--logdir")
    with pytest.raises(ValueError, match=r"^--logdir .*logs/run: cannot create the folder, a part "
                                         r"of the path \(.*logs\) is a file"):
        check_writable(tmp_path / "logs" / "run", option="--logdir")


def test_check_writable_when_files_cannot_be_created(tmp_path, monkeypatch):
    def refuse(path, mode):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(css_io, "_open_new", refuse)
    with pytest.raises(ValueError, match=r"^--checkpoint .*ro: cannot write into the folder "
                                         r"\(Permission denied\); pass a folder you can write to"):
        check_writable(tmp_path / "ro", option="--checkpoint")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_check_writable_on_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="--checkpoint .*cannot write into the folder"):
            check_writable(folder, option="--checkpoint")
    finally:
        folder.chmod(0o700)


# ---------------------------------------------------------------------------------------------
# Every writer goes through it: same temporary pattern, same modes (mkstemp would give 0600)
# ---------------------------------------------------------------------------------------------
def test_writers_use_the_one_atomic_write(tmp_path, umask, monkeypatch):
    from dataset import incremental
    from dataset.memory import MemoryEntry, save_memory
    from utils.pseudo import Thresholds, ThresholdCache, ThresholdKey
    from utils.results import append_results_row, write_run_info

    assert checkpoint.atomic_write is css_io.atomic_write
    umask(0o022)
    written = []
    real = css_io.temp_path_for

    def spy(path):
        written.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(css_io, "temp_path_for", spy)
    checkpoint.save_atomic({"epoch": 1}, tmp_path / "c.pth")
    save_memory(tmp_path / "m.json", [MemoryEntry("a.jpg", (1,))])
    key = ThresholdKey("w", "voc", "15-5", 1, "entropy", None, True, 0.001, None, 16, 21, 10)
    cache_file = ThresholdCache(tmp_path).save(key, Thresholds(torch.zeros(21), 1.0))
    append_results_row(tmp_path / "r.csv", 0, [50.0], 21, 1, 50.0)
    write_run_info(tmp_path / "r.csv", {"seed": 1}, step=0)
    incremental._save_npy(str(tmp_path / "train-0.npy"), np.arange(3))
    incremental._save_json(str(tmp_path / "train-0.json"), {"n": 3})
    names = ["c.pth", "m.json", cache_file.name, "r.csv", "r.json", "train-0.npy", "train-0.json"]
    assert written == names
    assert all(_mode(tmp_path / name) == 0o644 for name in names)
    assert not [n for n in os.listdir(tmp_path) if is_temp_file_name(n)]
