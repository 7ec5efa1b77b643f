"""summarize on hand-made run folders and a real (sqlite) Optuna study: no training needed."""

import csv
import json
import re
import shutil
import subprocess
import sys

import optuna
import pytest
import yaml

from gcode_exp import summarize
from gcode_exp.summary.chart import chart_label
from gcode_exp.summary.groups import finished_runs, group_labels, short_labels
from gcode_exp.summary.runs import find_runs
from gcode_exp.summary.tables import METRICS, as_table, csv_text, markdown
from gcode_exp.sweeps import TRIAL_FILE, display_url, same_params
from tests.conftest import ROOT, SAMPLE

PARAMS = {"aug.oversample_factor": 3, "model.loss_weights.command": 2.718281828459045}


def make_run(folder, name="demo", seed=0, metrics=None, error=None, overrides=(), trial=None, model="multihead"):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(
        f"name: {name}\nseed: {seed}\noptimized_metric: val/token_macro_recall\nmodel: {{name: {model}}}\n"
        "aug: {name: 3x, oversample_factor: 3}\nvocab: {name: v2}\nfeatures: {name: all}\n")
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (folder / "error.txt").write_text(error)
    if trial is not None:
        (folder / TRIAL_FILE).write_text(json.dumps(trial))
    return folder


def with_config(run, **parts):
    """`run`'s recorded config with these top-level parts set (keys the other runs lack, swept values)."""
    path = run / ".hydra" / "config.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | parts))
    return run


def md_tables(text: str) -> list[list[list[str]]]:
    """Each Markdown table in `text` as rows of cells (header first, separator left out), once it is checked
    to be aligned: every line of a table has its `|` where the header line has them."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            bars = [[m.start() for m in re.finditer(r"\|", row)] for row in block]
            assert all(b == bars[0] for b in bars), "\n".join(block)
            tables.append([[c.strip() for c in row.split("|")[1:-1]] for row in block if set(row) - set("|-")])
        block = []
    return tables


def test_seeds_group_into_mean_and_sd_with_one_majority_row(tmp_path):
    for seed, acc in ((0, 0.5), (1, 0.7)):
        make_run(tmp_path / f"{seed}_demo", seed=seed, metrics={
            "test/command_acc": acc, "majority/command_acc": 0.9, "epochs": 3, "sec_per_epoch": 1.5,
            "collapsed": seed == 1})
    make_run(tmp_path / "2_other", name="other", seed=0, model="baseline",
             metrics={"test/command_acc": 0.2, "majority/command_acc": 0.9, "epochs": 5, "collapsed": False})
    rows = summarize.main([str(tmp_path)])
    assert [r["approach"] for r in rows] == ["demo", "other", "majority reference"]
    assert rows[0]["seeds"] == 2 and rows[0]["command_acc"] == "0.600 ± 0.141" and rows[0]["collapsed"] == "1/2"
    assert rows[0]["multihead"] is True and rows[1]["multihead"] is False and rows[0]["aug"] == "3x"
    assert rows[0]["sec_per_epoch"] == "1.5 ± 0.0" and rows[1]["epochs"] == "5"
    assert rows[2]["command_acc"] == "0.900"  # same test windows: one number, not a spread
    with open(tmp_path / "summary.csv") as f:
        assert [r["approach"] for r in csv.DictReader(f)] == ["demo", "other", "majority reference"]
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_unfinished_and_failed_runs_are_listed_not_fatal(tmp_path, capsys):
    make_run(tmp_path / "0_a")  # no metrics.json, no error.txt: still running or killed
    make_run(tmp_path / "1_b", error="")  # an empty error.txt must not crash either
    make_run(tmp_path / "10_c", error="DataError: data/x.csv: no rows\n")
    rows = summarize.main([str(tmp_path)])
    assert rows == []
    out = capsys.readouterr().out
    assert "(no finished runs)" in out and "0 finished" in out
    text = (tmp_path / "summary.md").read_text()
    assert "0_a: unfinished" in text and "1_b: failed: (empty error.txt)" in text
    assert text.index("1_b") < text.index("10_c")  # job folders in the order Hydra ran them
    assert "10_c: failed: DataError: data/x.csv: no rows" in text
    assert not (tmp_path / "summary.png").exists()


def test_not_a_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        summarize.main([str(tmp_path / "nope")])
    assert e.value.code == 2


def test_trials_from_run_folders_and_optimization_results(tmp_path, capsys):
    for n, value in ((0, 0.25), (1, 0.5)):
        make_run(tmp_path / f"{n}_optuna", name="optuna", metrics={"val/token_macro_recall": value, "epochs": 1},
                 trial={"study": "s", "trial": n, "params": {**PARAMS, "aug.oversample_factor": n + 1}})
    (tmp_path / "optimization_results.yaml").write_text(
        "name: optuna\nbest_params:\n  aug.oversample_factor: 2\nbest_value: 0.5\n")
    rows = summarize.main([str(tmp_path)])
    assert [r["approach"] for r in rows] == ["optuna #0", "optuna #1", "majority reference"]  # never merged
    text = capsys.readouterr().out
    assert "best value 0.5000" in text and "'aug.oversample_factor': 2" in text
    with open(tmp_path / "trials.csv") as f:
        trials = list(csv.DictReader(f))
    assert [(t["trial"], t["value"], t["aug.oversample_factor"], t["run"]) for t in trials] == [
        ("0", "0.2500", "1", "finished"), ("1", "0.5000", "2", "finished")]
    assert trials[1]["model.loss_weights.command"] == "2.718" and trials[1]["folder"].endswith("1_optuna")


def test_study_from_storage_names_each_trials_folder(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    dist = {"aug.oversample_factor": optuna.distributions.IntDistribution(1, 7),
            "model.loss_weights.command": optuna.distributions.FloatDistribution(0.3, 30, log=True)}
    linked = make_run(tmp_path / "a" / "0_optuna", name="optuna", metrics={"epochs": 1})
    study.add_trial(optuna.trial.create_trial(params=PARAMS, distributions=dist, value=0.4,
                                              user_attrs={"folder": str(linked)}))
    # an older trial without the attribute: found by its parameters in the overrides
    old = {"aug.oversample_factor": 5, "model.loss_weights.command": 0.5}
    by_params = make_run(tmp_path / "b" / "0_optuna", name="optuna", error="boom",
                         overrides=["hparams_search=optuna", "aug.oversample_factor=5",
                                    "model.loss_weights.command=0.5"])
    study.add_trial(optuna.trial.create_trial(params=old, distributions=dist, state=optuna.trial.TrialState.FAIL))
    study.add_trial(optuna.trial.create_trial(params={**old, "aug.oversample_factor": 6}, distributions=dist,
                                              value=0.1))  # its folder is on another machine
    summarize.main([str(tmp_path), "--storage", storage])  # --study found: the storage holds one
    text = capsys.readouterr().out
    assert "Optuna study `s` (3 trials: 2 complete, 1 fail)" in text
    with open(tmp_path / "trials.csv") as f:
        trials = list(csv.DictReader(f))
    assert [t["state"] for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert [t["folder"] for t in trials] == [str(linked), str(by_params), "-"]
    assert trials[0]["value"] == "0.4000" and trials[1]["value"] == "-"


def test_storage_with_several_studies_needs_a_name(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    for name in ("one", "two"):
        optuna.create_study(study_name=name, storage=storage)
    make_run(tmp_path / "0_demo", metrics={"test/command_acc": 0.5})
    with pytest.raises(SystemExit, match="one, two") as e:
        summarize.main([str(tmp_path), "--storage", storage])
    assert e.value.code == 2
    summarize.main([str(tmp_path), "--storage", storage, "--study", "two"])
    assert "Optuna study `two` (0 trials" in (tmp_path / "summary.md").read_text()


def test_same_params_matches_the_sweepers_override_strings():
    overrides = {k: str(v) for k, v in PARAMS.items()} | {"seed": "0"}
    assert same_params(overrides, PARAMS)
    assert not same_params(overrides, {**PARAMS, "model.loss_weights.command": 2.7182})
    assert not same_params(overrides, {"model.loss_weights.type": 1.0}) and not same_params(overrides, {})


def test_display_url_hides_the_password_and_anchors_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert display_url("postgresql://user:secret@db:5432/optuna") == "postgresql://user:***@db:5432/optuna"
    assert display_url("sqlite:///optuna.db") == f"sqlite:///{tmp_path.resolve() / 'optuna.db'}"


# --- bad input on the command line: one line on stderr naming the file or option, exit 2, nothing written ---


def summarize_cmd(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gcode_exp.summarize", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def files_under(folder) -> list:
    return sorted(p for p in folder.rglob("*"))


def refused(ran: subprocess.CompletedProcess, line: str) -> None:
    """Exit code 2 and exactly `line` on stderr (no traceback), nothing on stdout."""
    assert (ran.returncode, ran.stderr.splitlines(), ran.stdout) == (2, [line], ""), ran.stderr


def test_a_folder_without_run_folders_is_refused_and_nothing_written(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    data = tmp_path / "data"  # a data folder: recordings, notes, a stray error.txt, no run folder
    data.mkdir()
    shutil.copy(next(SAMPLE.glob("*.csv.gz")), data)
    (data / "notes.txt").write_text("x")
    (data / "error.txt").write_text("not a job's")
    before = files_under(tmp_path)
    refused(summarize_cmd(empty), f"error: {empty}: no run folders in it")
    refused(summarize_cmd(data), f"error: {data}: no run folders in it")
    make_run(tmp_path / "sweep" / "0_demo", metrics={"test/command_acc": 0.5})
    refused(summarize_cmd(tmp_path / "sweep", empty), f"error: {empty}: no run folders in it")  # any path
    assert files_under(tmp_path) == sorted([*before, *files_under(tmp_path / "sweep"), tmp_path / "sweep"])
    refused(summarize_cmd(tmp_path / "nope"), f"error: {tmp_path / 'nope'}: not a folder")


def test_jobs_that_failed_before_their_config_are_listed_as_failed(tmp_path):
    for n, why in enumerate(("model.d_model=32: unknown key", "data.window=0: must be a whole number >= 1")):
        job = tmp_path / f"{n}_nearest-none-v2"
        job.mkdir()
        (job / "error.txt").write_text(why + "\nmore\n")
    ran = summarize_cmd(tmp_path)
    assert ran.returncode == 0 and ran.stderr == "", ran.stderr
    assert "2 run folders (0 finished)" in ran.stdout
    text = (tmp_path / "summary.md").read_text()
    assert f"- {tmp_path / '0_nearest-none-v2'}: failed: model.d_model=32: unknown key\n" in text
    assert f"- {tmp_path / '1_nearest-none-v2'}: failed: data.window=0: must be a whole number >= 1\n" in text


def test_a_trial_file_without_a_trial_number_is_warned_about_and_skipped(tmp_path):
    run = make_run(tmp_path / "0_optuna", name="optuna", metrics={"test/command_acc": 0.5})
    (run / TRIAL_FILE).write_text("{}")
    ran = summarize_cmd(tmp_path)
    assert ran.returncode == 0
    assert ran.stderr.splitlines() == [f"warning: {run / TRIAL_FILE}: damaged, skipped (no trial number)"]
    assert md_tables((tmp_path / "summary.md").read_text())[0][1][0] == "optuna"  # an ordinary run, not a trial
    assert not (tmp_path / "trials.csv").exists()


def test_a_damaged_optimization_results_file_is_warned_about_and_skipped(tmp_path):
    make_run(tmp_path / "0_optuna", name="optuna", metrics={"test/command_acc": 0.5})
    damaged = tmp_path / "optimization_results.yaml"
    damaged.write_text("best_value: [unclosed\n")
    ran = summarize_cmd(tmp_path)
    assert ran.returncode == 0 and "Traceback" not in ran.stderr
    assert [line.split(" (")[0] for line in ran.stderr.splitlines()] == [f"warning: {damaged}: damaged, skipped"]
    assert "Optuna sweeps" not in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("case", ["missing folder", "new file", "not a url", "in memory", "text file", "no tables"])
def test_a_bad_storage_is_refused_and_never_created(tmp_path, case):
    make_run(tmp_path / "0_demo", metrics={"test/command_acc": 0.5})
    db = tmp_path / "x.db"
    if case == "text file":
        db.write_text("not a database")
    if case == "no tables":
        make_table = f"import sqlite3; sqlite3.connect({str(db)!r}).execute('create table t(x)')"
        subprocess.run([sys.executable, "-c", make_table], check=True)
    url, why = {
        "missing folder": ("sqlite:////nonexistent/dir/x.db", "no such file (summarize reads a study's database, "
                                                               "never creates one)"),
        "new file": (f"sqlite:///{db}", "no such file (summarize reads a study's database, never creates one)"),
        "not a url": ("notaurl", "not a database URL (sqlite:///FILE, postgresql://USER@HOST/DB)"),
        "in memory": ("sqlite://", "an in-memory database holds no study; name the database file"),
        "text file": (f"sqlite:///{db}",
                      "cannot read it (DatabaseError: (sqlite3.DatabaseError) file is not a database)"),
        "no tables": (f"sqlite:///{db}", "not an Optuna storage (no 'studies' table)"),
    }[case]
    before = {p: p.read_bytes() for p in files_under(tmp_path) if p.is_file()}
    refused(summarize_cmd(tmp_path, "--storage", url), f"error: --storage {url}: {why}")
    assert {p: p.read_bytes() for p in files_under(tmp_path) if p.is_file()} == before  # no db, no summary


def test_a_study_not_in_the_storage_is_refused(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    for name in ("one", "two"):
        optuna.create_study(study_name=name, storage=storage)
    make_run(tmp_path / "0_demo", metrics={"test/command_acc": 0.5})
    before = files_under(tmp_path)
    refused(summarize_cmd(tmp_path, "--storage", storage, "--study", "nosuch"),
            "error: --study nosuch: no such study (the storage holds one, two)")
    refused(summarize_cmd(tmp_path, "--storage", storage),
            "error: --study: name the study (the storage holds one, two)")
    assert files_under(tmp_path) == before


def test_an_output_name_taken_by_a_folder_is_refused_before_any_write(tmp_path):
    make_run(tmp_path / "0_demo", metrics={"test/command_acc": 0.5})
    (tmp_path / "summary.md").mkdir()
    before = files_under(tmp_path)
    refused(summarize_cmd(tmp_path),
            f"error: {tmp_path / 'summary.md'}: is a folder; move it away to write the summary")
    assert files_under(tmp_path) == before  # summary.csv and summary.png not written either


def test_compare_errors_exit_2_with_one_line(tmp_path):
    make_run(tmp_path / "0_demo", metrics={"test/command_acc": 0.5})
    before = files_under(tmp_path)
    refused(summarize_cmd(tmp_path, "--compare", "demo", "nosuch"),
            "error: --compare demo nosuch: no finished run is named nosuch (approaches: demo)")
    assert files_under(tmp_path) == before


def test_metrics_option_chooses_the_columns_in_its_order(tmp_path):
    """`--metrics line_exact,param_value_acc,command_acc,epochs`: those columns, in that order, in the
    printed table, summary.md and summary.csv; a test metric outside the default list (param_value_acc) too."""
    for seed, acc in ((0, 0.5), (1, 0.7)):
        make_run(tmp_path / f"{seed}_demo", seed=seed, metrics={
            "test/command_acc": acc, "test/line_exact": 0.25, "test/param_value_acc": 0.125, "test/token_coverage": 1,
            "majority/command_acc": 0.9, "majority/line_exact": 0.1, "epochs": 3, "collapsed": False})
    ran = summarize_cmd(tmp_path, "--metrics", "line_exact,param_value_acc,command_acc,epochs")
    assert ran.returncode == 0 and ran.stderr == "", ran.stderr
    label = ["approach", "features", "vocab", "aug", "multihead", "split", "seeds", "folds", "n"]
    chosen = ["line_exact", "param_value_acc", "command_acc", "epochs"]
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == label + chosen
    assert [(r["approach"], r["line_exact"], r["command_acc"], r["epochs"]) for r in rows] == [
        ("demo", "0.250 ± 0.000", "0.600 ± 0.141", "3 ± 0"), ("majority reference", "0.100", "0.900", "-")]
    assert ran.stdout.startswith("| approach ") and (tmp_path / "summary.md").read_text() in ran.stdout
    table, intervals = md_tables(ran.stdout)
    assert table[0] == label + chosen and table[1][-4:] == ["0.250 ± 0.000", "0.125 ± 0.000", "0.600 ± 0.141", "3 ± 0"]
    # the interval table (two seeds) follows the same choice, without the run columns
    assert intervals[0] == ["approach", "features", "split", "n", "line_exact", "param_value_acc", "command_acc"]
    assert "token_coverage" not in ran.stdout and "sec_per_epoch" not in ran.stdout


@pytest.mark.parametrize("spec, line", [
    ("command_acc,comand_acc", "error: --metrics command_acc,comand_acc: unknown metric comand_acc; did you mean "
                               "command_acc? (known: {known})"),
    ("f1,bleu", "error: --metrics f1,bleu: unknown metric f1, bleu (known: {known})"),
    (",", "error: --metrics ',': name at least one metric (known: {known})"),
])
def test_an_unknown_metric_is_refused_naming_it_and_listing_the_known(tmp_path, spec, line):
    make_run(tmp_path / "0_demo", metrics={"test/command_acc": 0.5, "test/loss": 2.0})
    before = files_under(tmp_path)
    known = ", ".join([*METRICS, "loss", "sec_per_epoch", "epochs", "collapsed"])  # + the runs' own
    refused(summarize_cmd(tmp_path, "--metrics", spec), line.format(known=known))
    assert files_under(tmp_path) == before  # nothing written


def test_groups_that_read_alike_get_the_config_keys_that_tell_them_apart(tmp_path, capsys):
    """Two learning rates of one approach are two rows with a trainer.lr column (table, summary.csv, interval
    table, chart), never two rows that read the same. A key that only some runs have splits groups when it
    has several values (`-` where absent); with one value (added later, at its default) it is left out, and
    a key that only differs between rows that already read differently (model.name) adds no column."""
    for job, (lr, seed) in enumerate(((0.1, 0), (0.1, 1), (0.01, 0), (0.01, 1))):
        with_config(make_run(tmp_path / f"{job}_demo", seed=seed, metrics={"test/command_acc": lr + seed / 10}),
                    trainer={"lr": lr, "max_epochs": 3})
    make_run(tmp_path / "4_other", name="other", model="baseline", metrics={"test/command_acc": 0.5})
    rows = summarize.main([str(tmp_path), "--metrics", "command_acc"])
    label = ["approach", "features", "vocab", "aug", "multihead", "split", "trainer.lr", "seeds", "folds", "n"]
    assert list(rows[0]) == [*label, "command_acc"]
    assert [(r["approach"], r["trainer.lr"], r["n"], r["command_acc"]) for r in rows] == [
        ("demo", "0.1", 2, "0.150 ± 0.071"), ("demo", "0.01", 2, "0.060 ± 0.071"), ("other", "-", 1, "0.500"),
        ("majority reference", "-", "-", "-")]
    with open(tmp_path / "summary.csv", newline="") as f:
        assert [(r["approach"], r["trainer.lr"]) for r in csv.DictReader(f)][:2] == [("demo", "0.1"), ("demo", "0.01")]
    intervals = md_tables(capsys.readouterr().out)[1]
    assert intervals[0] == ["approach", "features", "split", "trainer.lr", "n", "command_acc"]
    assert [row[3] for row in intervals[1:]] == ["0.1", "0.01", "-"]
    labels = short_labels(group_labels(finished_runs(find_runs([tmp_path]))))
    assert [chart_label(row) for _, row in labels.iterrows()] == [
        "demo\nall\ntrainer.lr=0.1", "demo\nall\ntrainer.lr=0.01", "other\nall\ntrainer.lr=-"]


def test_markdown_columns_line_up_and_missing_cells_are_empty():
    table = as_table([{"trial": 0, "lr": "0.1", "folder": "a"}, {"trial": 12, "folder": "bb", "extra": 1}])
    assert markdown(table).splitlines() == [
        "| trial | lr  | folder | extra |",
        "|-------|-----|--------|-------|",
        "| 0     | 0.1 | a      |       |",
        "| 12    |     | bb     | 1     |"]
    assert csv_text(table) == "trial,lr,folder,extra\r\n0,0.1,a,\r\n12,,bb,1\r\n"


def test_predict_runs_get_predicts_columns_and_its_majority_row_without_warnings(tmp_path):
    """task=predict writes predict/* and majority/*, no test/*: the table shows those, not a row of `-`."""
    for n, (name, acc) in enumerate((("none", 0.7), ("crop", 0.5))):
        run = make_run(tmp_path / f"{n}_predict-{name}", model="align", metrics={
            "predict/row_line_acc": acc, "majority/row_line_acc": 0.2, "predict/program_acc": 0.8,
            "majority/program_acc": 0.1, "predict/files": 15})
        with_config(run, perturb={"name": name, "crop_start": 0.25 if name == "crop" else 0.0}, task="predict")
    ran = summarize_cmd(tmp_path)
    assert ran.returncode == 0 and ran.stderr == "", ran.stderr  # no pandas warning either
    header, *rows = md_tables((tmp_path / "summary.md").read_text())[0]
    assert "line_exact" not in header and "sec_per_epoch" not in header
    cell = {(r[header.index("perturb.name")], m): r[header.index(m)]
            for r in rows for m in ("row_line_acc", "program_acc")}
    assert cell["none", "row_line_acc"] == "0.700" and cell["crop", "row_line_acc"] == "0.500"
    assert cell["-", "row_line_acc"] == "0.200 ± 0.000" and cell["-", "program_acc"] == "0.100 ± 0.000"
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
