"""gcode_exp/atomic.py: every file the project writes appears whole or not at all."""

import json
import os

import pytest

from gcode_exp.atomic import atomic_write, write_csv, write_json, write_text


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"a": 1})

    def half(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write('{"a": ')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, half)
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_writers_create_folders_and_write_whole_files(tmp_path):
    write_text(tmp_path / "a" / "b.txt", "x\n")
    write_csv(tmp_path / "c.csv", [{"k": 1, "v": 2}, {"k": 3, "w": 4}])
    assert (tmp_path / "a" / "b.txt").read_text() == "x\n"
    assert (tmp_path / "c.csv").read_text().splitlines() == ["k,v,w", "1,2,", "3,,4"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_written_files_get_the_umask_mode_like_open_gives(tmp_path):
    """Plots, CSVs and JSON of a run stay readable to the group as before (not a temp file's 0600)."""
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
