import os
import shutil
import subprocess
import sys

import pytest

from gcode_exp import bench
from tests import forked_python
from tests.conftest import ROOT, SAMPLE


def test_model_keys_go_to_the_models_that_have_them():
    cfgs = bench.configs(str(SAMPLE), ["model.d_model=32", "++model.n_heads=2", "model.key=signal", "data.window=32"])
    assert list(cfgs) == ["default", "default_side", "baseline", "multihead", "new_programs", "toolpath", "rocket"]
    assert {n: c.model.name for n, c in cfgs.items()} == {
        "default": "align", "default_side": "align", "baseline": "baseline", "multihead": "multihead",
        "new_programs": "multihead",
        "toolpath": "toolpath", "rocket": "rocket"}
    assert "d_model" not in cfgs["default"].model and cfgs["default"].model.key == "signal"
    for name in ("baseline", "multihead", "new_programs"):
        assert (cfgs[name].model.d_model, cfgs[name].model.n_heads, "key" in cfgs[name].model) == (32, 2, False)
    assert all(c.data.window == 32 for c in cfgs.values())


# --- bad input: one line on stderr naming the file or key, exit 2, before any timing, nothing written ---


def bench_cmd(tmp_path, *args, timeout: int = 60) -> subprocess.CompletedProcess:
    """The real command, its temp files in tmp_path/tmp (to see that none is left behind). The timeout is
    far below a benchmark's minutes: a refusal must come before any timing."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    return forked_python.run([sys.executable, "-m", "gcode_exp.bench", *map(str, args)], cwd=ROOT, env=env,
                             timeout=timeout)


def refused(tmp_path, ran: subprocess.CompletedProcess, line: str) -> None:
    assert (ran.returncode, ran.stderr.splitlines(), ran.stdout) == (2, [line], ""), ran.stderr
    assert not (tmp_path / "b.json").exists() and list((tmp_path / "tmp").iterdir()) == []


def data_case(tmp_path, case: str):
    """A data folder for `case` and the line the bench must print for it."""
    folder = tmp_path / "data"
    if case == "missing folder":
        return folder, f"error: {folder}: data.dir is not a folder"
    folder.mkdir()
    if case == "empty folder":
        return folder, f"error: {folder}: no files match data.pattern='*.csv*'"
    if case == "one recording":
        shutil.copy(next(SAMPLE.glob("*.csv.gz")), folder)
        return folder, f"error: {folder}: split 'val' got no files: 1 usable files are too few (need 3)"
    (folder / "x_001_aligned.csv").write_text("time,x_motor,gcode_string\n")
    return folder, f"error: {folder / 'x_001_aligned.csv'}: header only, no rows"


@pytest.mark.parametrize("case", ["empty folder", "missing folder", "one recording", "header only"])
def test_an_unusable_data_dir_is_one_line(tmp_path, case):
    folder, line = data_case(tmp_path, case)
    refused(tmp_path, bench_cmd(tmp_path, "--data-dir", folder, "--out", tmp_path / "b.json", "data.window=32"), line)


@pytest.mark.parametrize("override, line", [
    ("model.d_modle=32", "error: model.d_modle=32: no model the bench times (default, default_side, baseline, "
                         "multihead, new_programs, toolpath, rocket) has the key model.d_modle; did you mean "
                         "model.d_model?"),
    ("model=baseline", "error: model=baseline: the bench times default, default_side, baseline, multihead, "
                       "new_programs, toolpath, rocket itself; give their keys as model.KEY=VALUE (each goes to the "
                       "models that have it)"),
    ("experiment=new_programs", "error: experiment=new_programs: sets model=multihead; the bench times default, "
                                "default_side, baseline, multihead, new_programs, toolpath, rocket itself"),
    ("nosuch=1", "error: nosuch=1: Could not override 'nosuch'. To append to your config use +nosuch=1"),
    ("aug=nosuch", "error: aug=nosuch: In 'config': Could not find 'aug/nosuch' (options: 3x, 5x, none)"),
    ("data.window=[", "error: data.window=[: cannot be parsed: no viable alternative at input '['"),
    ("model.d_model=0", "error: model.d_model=0: must be a whole number >= 1"),
])
def test_a_bad_override_is_one_line(tmp_path, override, line):
    refused(tmp_path, bench_cmd(tmp_path, "--data-dir", SAMPLE, "--out", tmp_path / "b.json", override), line)


def test_a_bad_out_or_steps_is_refused_before_any_work(tmp_path):
    missing = tmp_path / "nonexistent" / "dir" / "b.json"
    refused(tmp_path, bench_cmd(tmp_path, "--data-dir", SAMPLE, "--out", missing),
            f"error: --out={missing}: its folder {missing.parent} does not exist")
    (tmp_path / "file").write_text("x")
    refused(tmp_path, bench_cmd(tmp_path, "--out", tmp_path / "file" / "b.json"),
            f"error: --out={tmp_path / 'file' / 'b.json'}: its folder {tmp_path / 'file'} is a file")
    refused(tmp_path, bench_cmd(tmp_path, "--out", tmp_path), f"error: --out={tmp_path}: is a folder; name a file")
    refused(tmp_path, bench_cmd(tmp_path, "--out", tmp_path / "b.json", "--steps", "0"),
            "error: --steps=0: must be a whole number >= 1")
    refused(tmp_path, bench_cmd(tmp_path, "--out", tmp_path / "b.json", "--steps", "x"),
            "error: argument --steps: invalid int value: 'x' (see --help)")


@pytest.mark.parametrize("value", ["4,1", "0", "x", "1,1"])
def test_scale_bench_refuses_bad_factors(tmp_path, value):
    refused(tmp_path, bench_cmd(tmp_path, "--scale", value, "--out", tmp_path / "b.json"),
            f"error: --scale={value}: give increasing whole factors >= 1, e.g. --scale 1,4,10")
