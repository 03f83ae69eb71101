"""The one atomic writer: the final file is the old one or the new one, never half of one, and a
failure leaves no temporary file behind."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from sdn.atomic import (
    atomic_write,
    replace_dir,
    temp_dir,
    write_csv_atomic,
    write_json_atomic,
    write_text_atomic,
)


class DiskFull(OSError):
    pass


def _half_then_fail(tmp: Path) -> None:
    tmp.write_text("the first half of the new file")
    raise DiskFull(28, "No space left on device")


@pytest.mark.parametrize("failure", [DiskFull, KeyboardInterrupt])
def test_a_failure_midway_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path, failure) -> None:
    path = write_text_atomic("old contents\n", tmp_path / "out.txt")

    def write(tmp: Path) -> None:
        tmp.write_text("the first half of the new file")
        raise failure()

    with pytest.raises(failure):
        atomic_write(path, write)
    assert path.read_text() == "old contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_failure_on_a_new_file_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(DiskFull):
        atomic_write(tmp_path / "deep" / "new.bin", _half_then_fail)
    assert list((tmp_path / "deep").iterdir()) == []


def test_explain_sees_the_half_file_and_its_error_replaces_the_original(tmp_path: Path) -> None:
    seen = []

    def explain(error: Exception, tmp: Path) -> ValueError:
        seen.append((type(error), tmp.read_text()))
        return ValueError("disk full while writing out.txt: free space")

    with pytest.raises(ValueError, match="disk full") as info:
        atomic_write(tmp_path / "out.txt", _half_then_fail, explain)
    assert seen == [(DiskFull, "the first half of the new file")]
    assert isinstance(info.value.__cause__, DiskFull)
    assert list(tmp_path.iterdir()) == []


def test_explain_returning_none_keeps_the_original_error(tmp_path: Path) -> None:
    with pytest.raises(DiskFull):
        atomic_write(tmp_path / "out.txt", _half_then_fail, lambda error, tmp: None)


def test_the_writers_write_what_they_are_given(tmp_path: Path) -> None:
    data = {"b": 1.5, "a": [1, 2]}
    sorted_json = write_json_atomic(data, tmp_path / "m.json")
    assert sorted_json.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1.5\n}\n'
    unsorted = write_json_atomic(data, tmp_path / "u.json", sort_keys=False)
    assert list(json.loads(unsorted.read_text())) == ["b", "a"]
    rows = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    csv = write_csv_atomic(rows, tmp_path / "c.csv", columns=("step", "loss", "lr"))
    assert csv.read_text() == "step,loss,lr\n1,0.5,\n2,0.25,\n"
    assert pd.read_csv(write_csv_atomic(rows, tmp_path / "d.csv")).columns.tolist() == ["step", "loss"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "d.csv", "m.json", "u.json"]


def test_a_kill_leaves_a_temporary_file_the_next_write_replaces(tmp_path: Path) -> None:
    path = write_text_atomic("old\n", tmp_path / "out.txt")
    (tmp_path / ".out.txt.tmp").write_text("left by a killed writer")
    write_text_atomic("new\n", path)
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_folder_is_swapped_in_whole(tmp_path: Path) -> None:
    final = tmp_path / "raw"
    for contents in ("first", "second"):
        built = temp_dir(final)
        assert built.parent == tmp_path and built.name.startswith(".raw.") and built.name.endswith(".tmp")
        (built / "info.json").write_text(contents)
        replace_dir(built, final)
        assert (final / "info.json").read_text() == contents
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(final.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700


def test_a_swap_killed_between_its_renames_is_undone_by_the_next_run(tmp_path: Path) -> None:
    final = tmp_path / "samples"
    (tmp_path / ".samples.old").mkdir()  # the old folder, renamed away
    (tmp_path / ".samples.old" / "a.png").write_text("old picture")
    (tmp_path / ".samples.99-0badf00d.tmp").mkdir()  # the new one, never renamed in
    built = temp_dir(final)
    assert (final / "a.png").read_text() == "old picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == [built.name, "samples"]
