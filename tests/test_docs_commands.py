"""Every command shown in README.md and docs/*.md, run as a subprocess the way a reader would run it.

`documented_commands()` reads the commands from the Markdown: each line of a fenced code block (with
`\\` continuations joined and `# comments` dropped) and each inline code span that calls python
(`python`, `python3`, `.venv/bin/python`, also after `&&`; in a block also `gcode-exp`, the installed
run.py). COMMANDS, the one table below, says for each how it runs here and what must be true afterwards;
a documented command missing from COMMANDS, or an entry no longer in the docs, fails
`test_every_documented_command_is_in_the_table`.

How `run_doc` runs a command, on tiny settings (conftest's TINY, 1 epoch, one torch thread):

- in a scratch folder shared by the whole session (so `outputs/`, `multirun/`, `optuna.db` and the other
  relative paths of the docs land there, never in the checkout), with `python` the test's interpreter,
  `run.py` this checkout's and `gcode-exp` this environment's (`python -m gcode_exp` and `gcode-exp` are
  treated as run.py; `torchrun` is `python -m torch.distributed.run`, its options kept, the program it starts
  treated as above); `python3 -m venv` and `pip install` steps of a chain are not repeated
  (the tests already run in that environment) and `mkdir -p` steps are done;
- placeholders replaced: RUN -> the run folder the quick-start command trained, DIR -> a folder of six
  sample recordings, `multirun/<date>/<time>` -> the sweep folder the command's first `needs` made,
  `/tmp/doc/` -> `doc/` in the scratch folder, `../shared/data/cnc_sensor_gcode` and `/shared/recordings`
  -> the embedded sample (a subset of that data), `$(hostname)-$$` -> `doc-host-1`, `$VAR` -> the
  entry's environment; an entry's `setup` gives its own (RELIABILITY.md's DIR, TMP and FOLDER, the
  interrupted RUN that `trainer.resume=true` continues);
- `run.py` gets TINY (`tiny_for`: without the token-model sizes where it runs a model that learns nothing) and
  TINY_RUN (these win over the documented values: the command's options are kept, its
  size is not), data.dir (the sample) and data.cache_dir (the session's) unless the command sets them,
  then the entry's `extra` (e.g. FEW_TRIALS), which win over everything.

Kinds: RUN runs. COMPOSE (SLURM submission) cannot run without a cluster: the command is composed with
`--cfg all`, once per value of each swept key, and the config checked and validated. PG runs only with
GCODE_EXP_PG_URL set (CI: .ci/postgres.sh), in a fresh database of that server, and is skipped with the
reason otherwise. CUDA runs where torch sees a GPU; elsewhere it must exit 2 with the one line 'no such
device'. CI (the test-suite command) is not run inside the tests: .ci/run must hold it verbatim. SERVER
(`optuna-dashboard STORAGE`, a documented program of a code block) is started on a free port of
127.0.0.1, asked over HTTP until it answers, then stopped.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, SAMPLE, TINY, tiny_for

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN, COMPOSE, PG, CUDA, CI, SERVER = "run", "compose-only", "postgres", "cuda", "ci", "server"
TINY_RUN = ("trainer.line_exact=false", "hardware.threads=1")  # beside TINY (tiny_for: sizes for a learner)
FEW_TRIALS = ("hydra.sweeper.n_trials=2",)  # an Optuna sweep runs 2 trials here, whatever the docs ask for
BENCH_TINY = ("--steps", "2", *(o for o in TINY if o.startswith(("data.", "model.", "++model."))))
PYTHON = re.compile(r"(?:^|&&\s*)(?:\S*/)?python3?\s")
COMMAND = re.compile(rf"{PYTHON.pattern}|^(?:gcode-exp|torchrun|optuna-dashboard)\s")  # in a code block, also these
GCODE_EXP = Path(sys.executable).parent / "gcode-exp"  # the console script of this environment


# --- reading the commands out of the Markdown --------------------------------------------------------
def documented_commands() -> dict[str, str]:
    """Every command the docs show -> where (file and line of its first appearance)."""
    found: dict[str, str] = {}
    for doc in DOCS:
        text = doc.read_text()
        for block in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
            first = text.count("\n", 0, block.start(1)) + 1
            for offset, line in joined_lines(block.group(1)):
                line = " ".join(re.sub(r"\s+#.*$", "", line).split())
                if COMMAND.search(line):
                    found.setdefault(line, f"{doc.name}:{first + offset}")
        prose = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
        for span in re.finditer(r"`([^`\n]+)`", prose):
            if PYTHON.match(span.group(1)):
                line = text.count("\n", 0, span.start()) + 1
                found.setdefault(" ".join(span.group(1).split()), f"{doc.name}:{line}")
    return found


def joined_lines(block: str) -> list[tuple[int, str]]:
    out, pending, start = [], "", 0
    for i, line in enumerate(block.splitlines()):
        if not pending:
            start = i
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            out.append((start, pending + line))
            pending = ""
    return out


# --- what must be true after some commands (beyond exit code, files and text) --------------------------
def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def run_folder_as_the_readme_says(ran: Ran) -> None:
    """README, 'Reading a run folder': every file of the table (error.txt only on failure)."""
    for name in ("metrics.json", "history.csv", "per_class.csv", "vocab.json", "data_summary.json",
                 "checkpoints/best.pt", "checkpoints/last.pt", "plots", ".hydra", "run.log"):
        assert (ran.folder / name).exists(), f"the run folder lacks {name}: {sorted(os.listdir(ran.folder))}"
    assert not (ran.folder / "error.txt").exists()
    m = metrics(ran.folder)
    for key in ("val/token_macro_recall", "test/command_acc", "majority/command_acc", "best_epoch", "epochs",
                "sec_per_epoch", "collapsed"):
        assert key in m, f"metrics.json lacks {key}"
    assert f"run folder: {ran.folder}" in ran.out, "the quick start must print where its run folder is"


def beats_the_majority_line(ran: Ran) -> None:
    """README, 'Quick start': the default ends with its test scores beside the majority reference's,
    above it, and says where its run folder is."""
    m = metrics(ran.folder)
    assert m["test/line_exact"] > m["majority/line_exact"] + 0.3, (m["test/line_exact"], m["majority/line_exact"])
    assert f"run folder: {ran.folder}" in ran.out, "the quick start must print where its run folder is"


def help_lists_the_readme_groups(ran: Ran) -> None:
    """README, 'The config groups': the table's groups and options are what `--help` lists."""
    readme = (ROOT / "README.md").read_text()
    table = {g: set(re.findall(r"`([^`]+)`", opts)) for g, opts in re.findall(r"^\| `(\w+)` \| (.*?) \|", readme, re.M)}
    listed = {g: set(opts.split(", ")) for g, opts in re.findall(r"^(\w+): (.+)$", ran.out, re.M) if g in table}
    assert listed == table, f"--help lists {listed}, the README's table says {table}"


def profiled_steps(ran: Ran) -> None:
    """README, 'Debugging': a Chrome trace of the profiled training steps, and the operator table logged."""
    trace = json.loads((ran.folder / "profile" / "trace.json").read_text())
    assert sum(e.get("name", "").startswith("ProfilerStep") for e in trace["traceEvents"]) == 5
    assert "profile of 5 training steps" in ran.out


def few_batches(ran: Ran) -> None:
    """README, 'Debugging and running from anywhere': debug=fast trains 2 batches of one epoch, in a run
    folder under the working folder, with the resolved config."""
    assert ran.folder.parent.parent == ran.cwd / "outputs", ran.folder
    with open(ran.folder / "history.csv") as f:
        assert [r["steps"] for r in csv.DictReader(f)] == ["2"]
    assert "${" not in (ran.folder / "resolved_config.yaml").read_text()


def one_batch_per_epoch(ran: Ran) -> None:
    with open(ran.folder / "history.csv") as f:
        assert {r["steps"] for r in csv.DictReader(f)} == {"1"}


def trained_by_two_processes(ran: Ran) -> None:
    """README, 'Data-parallel training': one run folder (a new one under outputs/), one log of it (rank 0)."""
    assert ran.folder.parent.parent == ran.cwd / "outputs", ran.folder
    assert ran.out.count("run folder: ") == 1 and ran.out.count("epoch   1 |") == 1, ran.out
    assert yaml.safe_load((ran.folder / "resolved_config.yaml").read_text())["hardware"]["distributed"] is True
    assert metrics(ran.folder)["epochs"] == 1


def eval_scores_the_checkpoint(ran: Ran) -> None:
    m = metrics(ran.folder)
    assert "test/token_macro_recall" in m and "majority/token_macro_recall" in m, sorted(m)
    assert m["ckpt_path"].endswith("checkpoints/best.pt")


def one_job_per_perturbation(ran: Ran) -> None:
    """README, 'Perturbations': each job scored the recordings as its option changes them, and says so."""
    done = [(json.loads((j / "data_summary.json").read_text())["perturb"]["name"], metrics(j)["perturb"])
            for j in ran.jobs]
    assert done[:3] == [("none", "none"), ("crop", "crop_start=0.25"), ("pace_slow", "pace=0.8")], done
    assert len({p for _, p in done}) == 8 and done[-1] == ("unplug", "unplug=0.25"), done


def boards_unplugged_or_failing(ran: Ran) -> None:
    """RESULTS, 'a board that fails mid-recording': four jobs, each saying how its boards went."""
    done = [metrics(j)["perturb"] for j in ran.jobs]
    assert done == ["unplug=0.25", "unplug=0.25 unplug_from=0.5", "unplug=0.5", "unplug=0.5 unplug_from=0.5"], done


def new_programs_answered_by_fallback(ran: Ran) -> None:
    """README, 'Known or new': fold 0 holds the adaptive family out of training; DIR's adaptive recordings are
    found new and answered by the toolpath, its face and pocket ones by the alignment, with their program."""
    rows = {r["recording"]: r for r in csv.DictReader((ran.folder / "program.csv").open())}
    assert len(rows) == 6, rows
    for name, r in rows.items():
        new = name.startswith("adaptive")
        assert r["answered_by"] == ("fallback" if new else "checkpoint"), r
        assert (float(r["novelty"]) >= 0.3) == new and (r["program"] == "") == new, r
        assert new or float(r["novelty"]) <= 0.05, r
    assert "no known program" in ran.out


def resumed_after_epoch_1(ran: Ran) -> None:
    assert "resuming after epoch 1 from" in ran.out
    assert metrics(ran.folder)["epochs"] == 2, "the resumed run must end with epoch 1 from last.pt plus epoch 2"


def named_by_experiment(ran: Ran) -> None:
    assert [j.name for j in ran.jobs] == ["0_baseline", "1_augmented", "2_multihead", "3_multihead_aug"]


def summary_rows(*approaches: str, seeds: int = 1) -> Callable[[Ran], None]:
    def check(ran: Ran) -> None:
        with open(ran.folder / "summary.csv") as f:
            rows = list(csv.DictReader(f))
        assert [r["approach"] for r in rows] == [*approaches, "majority reference"]
        assert all(r["seeds"] == str(seeds) for r in rows[:-1]), [r["seeds"] for r in rows]
    return check


def summary_columns(*chosen: str) -> Callable[[Ran], None]:
    """SWEEPS.md, `summarize --metrics`: the run-describing columns, then exactly the chosen metrics."""
    def check(ran: Ran) -> None:
        with open(ran.folder / "summary.csv") as f:
            header = next(csv.reader(f))
        assert header[header.index("n") + 1 :] == list(chosen), header
        cells = [c.strip() for c in ran.out.splitlines()[0].split("|")[1:-1]]  # padded: the columns line up
        assert cells[0] == "approach" and cells[-len(chosen):] == list(chosen), cells
    return check


def optuna_trials(study: str, numbers: set[int] | None = None) -> Callable[[Ran], None]:
    def check(ran: Ran) -> None:
        infos = [json.loads((j / "optuna_trial.json").read_text()) for j in ran.jobs]
        assert {i["study"] for i in infos} == {study}
        if numbers is not None:
            assert {i["trial"] for i in infos} == numbers
    return check


def study_listed(study: str, first_folders: tuple[str, ...] = ()) -> Callable[[Ran], None]:
    """summarize --storage: the study's trials in trials.csv, each naming a folder that exists."""
    def check(ran: Ran) -> None:
        assert f"Optuna study `{study}` (" in ran.out
        with open(ran.folder / "trials.csv") as f:
            trials = list(csv.DictReader(f))
        assert trials and all(t["state"] == "COMPLETE" and Path(t["folder"]).is_dir() for t in trials), trials
        rel = [os.path.relpath(t["folder"], ran.cwd) for t in trials[: len(first_folders)]]
        assert rel == list(first_folders)
    return check


def held_out_families(ran: Ran) -> None:
    """RESULTS.md, 'Cross-validation': one job per program family, each testing on that family only."""
    splits = [json.loads((j / "data_summary.json").read_text())["split"] for j in ran.jobs]
    assert [s["test_family"] for s in splits] == ["adaptive", "face", "pocket"], splits


def submitit_job_folders(ran: Ran) -> None:
    logs = list((ran.folder / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2, f"expected one .submitit/<job id>/ (with its log) per job: {logs}"


def bench_json(name: str) -> Callable[[Ran], None]:
    """README and RESULTS, 'Speed': every figure printed and written (`name`), each one measured (> 0)."""
    def check(ran: Ran) -> None:
        result = json.loads((ran.cwd / name).read_text())
        assert set(result["models"]) == {"baseline", "multihead", "new_programs"}
        for m in result["models"].values():
            assert min(m[k] for k in ("bare_windows_per_s", "pipeline_windows_per_s", "latency_ms_batch1",
                                      "latency_ms_per_window_batch256", "live_ms_per_window")) > 0, m
        assert result["prepare_cold_s"] > result["prepare_cached_s"] > 0
        assert set(result["epoch_s_by_data_size"]) == {"1x", "2x", "4x"} and result["peak_rss_mb"] > 0
        default, side = result["default"], result["default_side"]  # fitted, not trained; side: the signal key
        assert "reference rows" in default["reference"] and "reference rows (signal)" in side["reference"]
        for fitted in (default, side, result["toolpath"], result["rocket"]):
            assert min(fitted[k] for k in ("fit_s", "latency_ms_batch1", "latency_ms_per_window_batch256")) > 0
        search = result["reference_search"]  # the nearest reference's index at 1x, 4x, 10x the training keys
        assert list(search) == ["1x", "4x", "10x"] and [v["keys"] for v in search.values()] == [
            search["1x"]["keys"] * k for k in (1, 4, 10)]
        assert all(v[f"{how}_ms_per_window_batch{n}"] > 0 for v in search.values() for how in ("index", "brute")
                   for n in (1, 256))
        for text in ("default side-channel (align", "toolpath: fitted in", "rocket: fitted in",
                     "reference search (model=nearest)", "4x/1x"):
            assert text in ran.out, text
    return check


def sgd_with_momentum(ran: Ran) -> None:
    (group,) = torch.load(ran.folder / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert group["momentum"] == 0.9 and "betas" not in group, group


def cosine_schedule(ran: Ran) -> None:
    """README: the schedule group is applied: after the run's steps its rate is below the peak (constant: at it)."""
    blob = torch.load(ran.folder / "checkpoints" / "last.pt", weights_only=True)
    (group,) = blob["optimizer"]["param_groups"]
    assert blob["config"]["trainer"]["scheduler"]["_target_"].endswith("WarmupCosine"), blob["config"]["trainer"]
    assert 0 < group["lr"] < group["initial_lr"] and blob["scheduler"]["last_epoch"] > 0, group


def scale_json(ran: Ran) -> None:
    """RESULTS, 'Scale': per factor, copies of the recordings prepared cold, per-file cached, cached and with
    one file added, then a real training run's epoch time and peak memory; the copies removed after."""
    scale = json.loads((ran.cwd / "docs/bench_scale.json").read_text())["scale"]
    assert list(scale) == ["1x", "2x"] and [s["files"] for s in scale.values()] == [6, 12], scale
    for s in scale.values():
        assert min(s[k] for k in ("prepare_cold_s", "prepare_cached_s", "add_one_file_s", "epoch_s",
                                  "train_peak_rss_mb", "prepare_peak_rss_mb")) > 0, s
    assert scale["2x"]["train_windows"] > scale["1x"]["train_windows"]
    assert (ran.cwd / "tmp").is_dir() and not list((ran.cwd / "tmp").glob("gcode-exp-scale-*")), "copies left"


def damaged_file_refused(ran: Ran) -> None:
    """RELIABILITY.md, 'Damaged recordings': one line, nothing cached, only the config, run.log, error.txt."""
    assert ran.err.splitlines() == [f"error: {ran.cwd}/DIR-damaged/empty_001_aligned.csv: empty file"], ran.err
    assert not any(p.is_file() for p in (ran.cwd / "TMP" / "cache").rglob("*")), "something was cached"
    left = sorted(os.listdir(ran.cwd / "TMP" / "run"))
    assert left == [".hydra", "error.txt", "resolved_config.yaml", "run.log"], left


def cut_metrics_skipped(ran: Ran) -> None:
    """RELIABILITY.md, 'Damaged run-folder files': one line naming the file, the table still written."""
    assert f"warning: {ran.folder}/1_augmented/metrics.json: damaged, skipped" in ran.err, ran.err
    assert f"{ran.folder}/1_augmented: failed: metrics.json is damaged" in (ran.folder / "summary.md").read_text()


def dashboard_lists(study: str) -> Callable[[Ran], None]:
    """SWEEPS.md, 'Watching a study in a browser': the page answers, and its API lists the sweep's study."""
    def check(ran: Ran) -> None:
        assert "<html" in ran.http["/"].lower(), ran.http["/"][:500]
        names = [st["study_name"] for st in json.loads(ran.http["/api/studies"])["study_summaries"]]
        assert study in names, names
    return check


def monitor_answers(ran: Ran) -> None:
    """README, 'The monitor page': the page, the listings, and the first machine's state once it has been read."""
    assert "gcode-exp monitor" in ran.http["/"] and "EventSource" in ran.http["/"]
    assert "face" in json.loads(ran.http["/programs"])
    assert json.loads(ran.http["/machines/face_003/state"])["id"] == "face_003"
    assert "serve: stopped after" in ran.out, ran.out[-2000:]


def every_row_shown(ran: Ran) -> None:
    shown, written = map(int, re.search(r"(\d+) of (\d+) rows shown", ran.out).groups())
    assert written > 0 and shown == written, ran.out


def slurm_composed(ran: Ran) -> None:
    assert [c["name"] for c in ran.configs] == ["baseline", "augmented", "multihead", "multihead_aug"]
    for c in ran.configs:
        launcher = c["hydra"]["launcher"]
        assert launcher["_target_"].endswith("SlurmLauncher"), launcher["_target_"]
        assert (launcher["partition"], launcher["gpus_per_node"], c["hardware"]["device"]) == ("gpu", 1, "cuda")


# --- the table ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Doc:
    kind: str = RUN
    needs: tuple[str, ...] = ()     # documented commands whose outputs this one reads (each runs once, first)
    extra: tuple[str, ...] = ()     # arguments added to run it here; `key=value` ones win over any other
    text: str | None = None         # what runs instead, where the docs abbreviate ("... the same ...")
    env: tuple[dict[str, str], ...] = ({},)  # one process per entry, all at once (a shell loop of `... &`)
    jobs: int | None = None         # job folders it must leave (a sweep), each with metrics.json, no error.txt
    files: tuple[str, ...] = ()     # paths that must exist afterwards, in its output folder
    says: tuple[str, ...] = ()      # text that must appear in its stdout or stderr
    code: int = 0
    check: Callable[[Ran], None] | None = None
    setup: Callable[[DocSession], dict[str, str]] | None = None  # placeholders of this entry only
    fast: bool = False              # RUN and PG entries are marked slow unless they train nothing
    http: tuple[str, ...] = ()      # task=serve: paths asked for once it listens (serve.port=0), then Ctrl-C


def quick_start_run(s: DocSession) -> dict[str, str]:
    """RUN: the quick start's default run (the page follows recordings with the default model)."""
    return {"RUN": str(s.result(QUICK_START).folder)}


def interrupted_copy(s: DocSession) -> dict[str, str]:
    """RUN for `trainer.resume=true`: the quick start's token-model run as an interrupted one (last.pt, no
    metrics.json)."""
    copy = s.ws / "interrupted"
    if not copy.exists():
        shutil.copytree(s.result(TOKEN_START).folder, copy)
        (copy / "metrics.json").unlink()
    return {"RUN": str(copy)}


def good_and_damaged(s: DocSession) -> dict[str, str]:
    """RELIABILITY.md's DIR: one good recording and one damaged (empty) file; TMP a scratch folder."""
    folder = s.ws / "DIR-damaged"
    folder.mkdir(exist_ok=True)
    shutil.copy(SAMPLE / "pocket_016_aligned.csv.gz", folder / "pocket_101_aligned.csv.gz")
    (folder / "empty_001_aligned.csv").write_text("")
    return {"DIR": str(folder), "TMP": str(s.ws / "TMP")}


def sweep_with_a_cut_metrics_file(s: DocSession) -> dict[str, str]:
    """RELIABILITY.md's FOLDER: a copy of the four-experiment sweep whose job 1 has a metrics.json cut short."""
    folder = s.ws / "FOLDER"
    if not folder.exists():
        shutil.copytree(s.result(EXPERIMENTS).folder, folder)
        cut = folder / "1_augmented" / "metrics.json"
        cut.write_text(cut.read_text()[:20])
    return {"FOLDER": str(folder)}


def plain_csv(s: DocSession) -> dict[str, str]:
    """README's FILE.csv for live mode: one sample recording, uncompressed (the file a logger appends to)."""
    path = s.ws / "live" / "FILE.csv"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(gzip.decompress((SAMPLE / "face_003_aligned.csv.gz").read_bytes()))
    return {"FILE.csv": str(path)}


def user_encoder(s: DocSession) -> dict[str, str]:
    """README, 'Adding an encoder': its Python block as my_encoders.py and its YAML block as
    my_conf/model/encoder/gru.yaml, in the working folder, exactly as shown."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Adding an encoder"):readme.index("## Speed")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    conf = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    (s.ws / "my_encoders.py").write_text(code)
    (s.ws / "my_conf" / "model" / "encoder").mkdir(parents=True, exist_ok=True)
    (s.ws / "my_conf" / "model" / "encoder" / "gru.yaml").write_text(conf)
    return {}


def user_model(s: DocSession) -> dict[str, str]:
    """README, 'Adding a model': its Python block as my_models.py and its YAML block as
    my_conf/model/frequent.yaml, in the working folder, exactly as shown."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Adding a model"):readme.index("## Adding an encoder")]
    (s.ws / "my_models.py").write_text(re.search(r"```python\n(.*?)```", section, re.S).group(1))
    (s.ws / "my_conf" / "model").mkdir(parents=True, exist_ok=True)
    (s.ws / "my_conf" / "model" / "frequent.yaml").write_text(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    return {}


def scored_like_the_majority(ran: Ran) -> None:
    """The user's model ran as a peer: fitted, checkpointed, scored; answering the most frequent line it
    scores what the majority reference scores, and its own key is in the run's config."""
    m = metrics(ran.folder)
    assert m["epochs"] == 0 and m["test/line_exact"] == m["majority/line_exact"], m
    assert (ran.folder / "checkpoints" / "best.pt").is_file() and ran.folder.name.endswith("frequent-none-v2")
    resolved = yaml.safe_load((ran.folder / "resolved_config.yaml").read_text())
    assert resolved["model"]["_target_"] == "my_models.MostFrequentLine" and resolved["model"]["top"] == 1


def trained_the_user_encoder(ran: Ran) -> None:
    resolved = yaml.safe_load((ran.folder / "resolved_config.yaml").read_text())
    assert resolved["model"]["encoder"] == {"_target_": "my_encoders.GRUEncoder", "stride": 2}, resolved["model"]
    assert metrics(ran.folder)["epochs"] == 1


QUICK_START = "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python run.py"
TOKEN_START = ".venv/bin/python run.py model=multihead aug=3x"  # the quick start's token model: RUN of the tasks
EXPERIMENTS = "python run.py -m experiment=baseline,augmented,multihead,multihead_aug"
OPTUNA = "python run.py -m hparams_search=optuna"
OPT1 = ("python run.py -m hparams_search=optuna hydra.sweeper.n_trials=2 trainer.max_epochs=2 hardware.threads=1 "
        "optuna_storage=sqlite:////tmp/doc/optuna.db hydra.sweep.dir=/tmp/doc/opt1")
OPT2 = "python run.py ... the same ... hydra.sweep.dir=/tmp/doc/opt2"
CMP = ("python run.py -m experiment=baseline,augmented,multihead,multihead_aug trainer.max_epochs=3 "
       "hardware.threads=1 hydra.sweep.dir=/tmp/doc/cmp")
PG_WORKERS = ("python run.py -m hparams_search=optuna hydra.sweeper.n_trials=3 trainer.max_epochs=2 hardware.threads=1 "
              "hydra.sweep.dir=/tmp/doc/pg/worker$w &")
REAL_COMPARISON = ("python run.py -m data.dir=../shared/data/cnc_sensor_gcode model=baseline,multihead "
                   "aug=none,3x model.row_weight=0 features=all,side_channel features.elapsed=false seed=0,1,2 "
                   "trainer.max_epochs=40 hydra.sweep.dir=multirun/real-comparison")
REAL_OPTUNA = ("mkdir -p multirun/real-optuna && python run.py -m hparams_search=optuna "
               "data.dir=../shared/data/cnc_sensor_gcode features=side_channel hydra.sweeper.n_trials=8 "
               "trainer.max_epochs=25 trainer.patience=6 optuna_storage=sqlite:///multirun/real-optuna/study.db "
               "hydra.sweep.dir=multirun/real-optuna/call1")
REAL_TOKEN_MODEL = ("mkdir -p multirun/real-token-model && python run.py -m hparams_search=token_model "
                    "data.dir=../shared/data/cnc_sensor_gcode features=side_channel hydra.sweeper.n_trials=6 "
                    "trainer.max_epochs=25 trainer.patience=6 hydra/launcher=joblib hydra.launcher.n_jobs=2 "
                    "hydra.sweeper.n_jobs=2 hardware.threads=1 trainer.plots=false "
                    "optuna_storage=sqlite:///multirun/real-token-model/study.db "
                    "hydra.sweep.dir=multirun/real-token-model/call1")
REAL_CV = ("python run.py -m experiment=cv data.dir=../shared/data/cnc_sensor_gcode features=all,side_channel "
           "trainer.max_epochs=25 hydra.sweep.dir=multirun/real-cv")
REAL_PRUNED = ("mkdir -p multirun/real-pruned && python run.py -m hparams_search=optuna "
               "data.dir=../shared/data/cnc_sensor_gcode hydra.sweeper.n_trials=10 trainer.max_epochs=12 "
               "hydra.sweeper.sampler.seed=0 hardware.threads=1 hparams_search.pruner=median "
               "optuna_storage=sqlite:///multirun/real-pruned/study.db hydra.sweep.dir=multirun/real-pruned")
REAL_UNPRUNED = REAL_PRUNED.replace("real-pruned", "real-unpruned").replace("pruner=median", "pruner=none")
SIX = "experiment=baseline,augmented,multihead,multihead_aug,new_programs,recommended"
REAL_FAMILY = (f"python run.py -m {SIX} data.dir=../shared/data/cnc_sensor_gcode "
               "features=all,side_channel data.split_by=operation 'data.fold=range(3)' trainer.max_epochs=25 "
               "hydra.sweep.dir=multirun/real-family")
REAL_WINDOW = (f"python run.py -m {SIX} data.dir=../shared/data/cnc_sensor_gcode "
               "features=all,side_channel data.split_by=window data.folds=5 'data.fold=range(5)' "
               "trainer.max_epochs=25 hydra.sweep.dir=multirun/real-window")
CV_DEFAULT = ("python run.py -m experiment=new_programs data.dir=../shared/data/cnc_sensor_gcode features=side_channel "
              "data.folds=5 'data.fold=range(5)' hydra.sweep.dir=multirun/real-cv-default")
WINDOW_DEFAULT = ("python run.py -m experiment=new_programs data.dir=../shared/data/cnc_sensor_gcode "
                  "features=side_channel data.split_by=window data.folds=5 'data.fold=range(5)' "
                  "hydra.sweep.dir=multirun/real-window-default")
KNOWN = ("python run.py data.dir=../shared/data/cnc_sensor_gcode data.split_by=operation data.fold=0 "
         "hydra.run.dir=/tmp/doc/known")
NEW = ("python run.py model=toolpath data.dir=../shared/data/cnc_sensor_gcode data.split_by=operation data.fold=0 "
       "hydra.run.dir=/tmp/doc/new")
KNOWN_OR_NEW = ("python run.py task=predict ckpt_path=/tmp/doc/known/checkpoints/best.pt "
                "predict.fallback=/tmp/doc/new/checkpoints/best.pt data.dir=DIR")
PERTURBATIONS = ("python run.py -m task=eval ckpt_path=RUN/checkpoints/best.pt data.dir=DIR "
                 "perturb=none,crop,pace_slow,pace_fast,shift,concat,shop,unplug")
UNPLUG_FROM = ("python run.py -m task=eval ckpt_path=RUN/checkpoints/best.pt data.dir=DIR perturb=unplug "
               "perturb.unplug=0.25,0.5 perturb.unplug_from=0,0.5")
ROCKET_KNOWN = ("python run.py -m model=rocket data.dir=../shared/data/cnc_sensor_gcode features=all,side_channel "
                "trainer.line_exact=true hydra.sweep.dir=multirun/rocket-known")
ROCKET_FAMILY = ("python run.py -m model=rocket data.dir=../shared/data/cnc_sensor_gcode features=all,side_channel "
                 "data.split_by=operation 'data.fold=range(3)' trainer.line_exact=true "
                 "hydra.sweep.dir=multirun/rocket-family")
SERVE = ("python run.py task=serve ckpt_path=RUN/checkpoints/best.pt "
         "serve.machines=[data/sample/face_003_aligned.csv.gz,data/sample/pocket_016_aligned.csv.gz]")
SUMMARY = ("summary.csv", "summary.md", "summary.png")
FOUR = ("baseline", "augmented", "multihead", "multihead_aug")
BEST = ("new_programs", "recommended")  # experiment=cv also runs the best token model and the default

COMMANDS: dict[str, Doc] = {
    # README.md
    QUICK_START: Doc(extra=("trainer.line_exact=true",), says=("majority reference: line_exact",),
                     check=beats_the_majority_line),
    TOKEN_START: Doc(extra=("trainer.plots=true",), check=run_folder_as_the_readme_says),
    "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/python -m pytest": Doc(kind=CI),
    ".venv/bin/python run.py data.dir=../shared/data/cnc_sensor_gcode": Doc(files=("metrics.json",)),
    "python run.py data.dir=../shared/data/cnc_sensor_gcode": Doc(files=("metrics.json",)),  # RESULTS, Speed
    "python run.py --help": Doc(fast=True, says=("== Groups (group=option) ==",), check=help_lists_the_readme_groups),
    "python run.py experiment=baseline": Doc(files=("metrics.json",)),
    "python run.py features=side_channel": Doc(files=("metrics.json",)),
    "python run.py model=toolpath features=all": Doc(files=("metrics.json", "checkpoints/best.pt")),
    KNOWN: Doc(files=("checkpoints/best.pt",)),
    NEW: Doc(files=("checkpoints/best.pt",)),
    KNOWN_OR_NEW: Doc(needs=(KNOWN, NEW), files=("program.csv", "predictions"),
                      check=new_programs_answered_by_fallback),
    "python run.py model=multihead aug.oversample_factor=5 model.loss_weights.command=5.0 trainer.batch_size=16":
        Doc(files=("metrics.json",)),
    "python run.py model=multihead trainer.optimizer._target_=torch.optim.SGD +trainer.optimizer.momentum=0.9":
        Doc(files=("metrics.json",), check=sgd_with_momentum),
    "python run.py model=multihead trainer/scheduler=cosine": Doc(files=("metrics.json",), check=cosine_schedule),
    "python run.py task=prepare data.dir=DIR": Doc(files=("data_summary.json",), says=("train:", "test :")),
    "python run.py task=eval ckpt_path=RUN/checkpoints/best.pt data.dir=DIR":
        Doc(needs=(TOKEN_START,), files=("metrics.json",), check=eval_scores_the_checkpoint),
    "python run.py trainer.resume=true hydra.run.dir=RUN":
        Doc(needs=(TOKEN_START,), setup=interrupted_copy, extra=("trainer.max_epochs=2",), check=resumed_after_epoch_1),
    "python run.py task=predict ckpt_path=RUN/checkpoints/best.pt data.dir=DIR":
        Doc(needs=(TOKEN_START,), files=("metrics.json", "program.csv", "predictions")),
    "python run.py task=predict predict.follow=true ckpt_path=RUN/checkpoints/best.pt data.path=FILE.csv":
        Doc(needs=(TOKEN_START,), setup=plain_csv, extra=("predict.idle_s=1",), says=("live:",)),
    PERTURBATIONS: Doc(needs=(TOKEN_START,), jobs=8, check=one_job_per_perturbation),
    UNPLUG_FROM: Doc(needs=(TOKEN_START,), jobs=4, check=boards_unplugged_or_failing),
    "python -m gcode_exp.bench_serve --ckpt RUN/checkpoints/best.pt --data-dir ../shared/data/cnc_sensor_gcode":
        Doc(needs=(QUICK_START,), setup=quick_start_run, extra=("--seconds", "4"), says=("monitor: 4 machines",),
            check=every_row_shown),
    ROCKET_KNOWN: Doc(extra=("model.features=300",), jobs=2),
    ROCKET_FAMILY: Doc(extra=("model.features=300",), jobs=6),
    SERVE: Doc(needs=(QUICK_START,), setup=quick_start_run, http=("/", "/programs", "/machines/face_003/state"),
               check=monitor_answers),
    "python run.py hardware=cuda": Doc(kind=CUDA, files=("metrics.json",), says=("on cuda",)),
    "torchrun --standalone --nproc_per_node=2 run.py hardware=ddp model=multihead":
        Doc(files=("metrics.json", "history.csv", "checkpoints/best.pt"), check=trained_by_two_processes),
    "python run.py debug=fast": Doc(files=("metrics.json",), check=few_batches),
    "python run.py debug=overfit": Doc(files=("metrics.json",), extra=("trainer.max_epochs=3",),
                                       check=one_batch_per_epoch),  # tests/cli/test_debug_and_cli.py: the loss falls
    "python run.py debug=profile": Doc(files=("metrics.json", "profile/trace.json"), check=profiled_steps),
    "python -m gcode_exp debug=fast": Doc(files=("metrics.json",), check=few_batches),
    "gcode-exp debug=fast data.dir=DIR": Doc(files=("metrics.json",), check=few_batches),
    "python -m gcode_exp model=frequent hydra.searchpath=[file://my_conf]":
        Doc(setup=user_model, files=("metrics.json",), check=scored_like_the_majority),
    "python -m gcode_exp model=multihead model/encoder=gru hydra.searchpath=[file://my_conf]":
        Doc(setup=user_encoder, files=("metrics.json",), check=trained_the_user_encoder),
    EXPERIMENTS: Doc(jobs=4, check=named_by_experiment),
    "python -m gcode_exp.summarize multirun/<date>/<time>":
        Doc(needs=(EXPERIMENTS,), files=SUMMARY, says=("4 run folders (4 finished)",), check=summary_rows(*FOUR)),
    OPTUNA: Doc(extra=FEW_TRIALS, jobs=2, files=("optimization_results.yaml",),
                check=optuna_trials("gcode-exp-multihead-all")),
    "python -m gcode_exp.bench --data-dir ../shared/data/cnc_sensor_gcode":
        Doc(extra=BENCH_TINY, says=("prepare: cold",), check=bench_json("bench.json")),
    # docs/SWEEPS.md
    CMP: Doc(jobs=4, check=named_by_experiment),
    "python -m gcode_exp.summarize /tmp/doc/cmp":
        Doc(needs=(CMP,), files=SUMMARY, says=("4 run folders (4 finished)",), check=summary_rows(*FOUR)),
    "python -m gcode_exp.summarize /tmp/doc/cmp --metrics command_macro_recall,token_macro_recall,collapsed":
        Doc(needs=(CMP,), files=SUMMARY, check=summary_columns("command_macro_recall", "token_macro_recall",
                                                              "collapsed")),
    "python run.py -m hparams_search=optuna hydra.sweeper.n_trials=5 features=side_channel":
        Doc(extra=FEW_TRIALS, jobs=2, check=optuna_trials("gcode-exp-multihead-side_channel")),
    "python run.py -m hparams_search=token_model hydra.sweeper.n_trials=20 features=side_channel":
        Doc(extra=(*FEW_TRIALS, "trainer.line_exact=true"), jobs=2,  # its objective is val/line_exact
            check=optuna_trials("gcode-exp-token_model-side_channel")),
    "python -m gcode_exp.summarize multirun/<date>/<time> --storage sqlite:///optuna.db":
        Doc(needs=(OPTUNA,), files=("trials.csv",), check=study_listed("gcode-exp-multihead-all")),
    OPT1: Doc(jobs=2, check=optuna_trials("gcode-exp-multihead-all", {0, 1})),
    OPT2: Doc(text=OPT1.replace("/tmp/doc/opt1", "/tmp/doc/opt2"), needs=(OPT1,), jobs=2,
              check=optuna_trials("gcode-exp-multihead-all", {2, 3})),
    "python -m gcode_exp.summarize /tmp/doc/opt1 /tmp/doc/opt2 --storage sqlite:////tmp/doc/optuna.db":
        Doc(needs=(OPT1, OPT2), files=("trials.csv",), check=study_listed(
            "gcode-exp-multihead-all", tuple(f"doc/opt{c}/{i}_optuna" for c in (1, 2) for i in (0, 1)))),
    "python run.py -m hparams_search=optuna hydra/launcher=joblib hydra.sweeper.n_jobs=2 hydra.launcher.n_jobs=2":
        Doc(extra=FEW_TRIALS, jobs=2, says=("Joblib.Parallel(n_jobs=2",)),
    "python run.py -m hydra/launcher=joblib hydra.launcher.n_jobs=2 seed=0,1":
        Doc(jobs=2, says=("Joblib.Parallel(n_jobs=2",)),
    "python run.py -m hparams_search=optuna hydra/launcher=joblib hydra.sweeper.n_jobs=2 hydra.launcher.n_jobs=2 "
    "hydra.sweeper.n_trials=2 trainer.max_epochs=2 hardware.threads=1 optuna_storage=sqlite:////tmp/doc/optuna.db "
    "hydra.sweep.dir=/tmp/doc/opt3":
        Doc(needs=(OPT1, OPT2), jobs=2, says=("Joblib.Parallel(n_jobs=2",),
            check=optuna_trials("gcode-exp-multihead-all", {4, 5})),
    "optuna-dashboard sqlite:///optuna.db":  # the storage the hparams_search=optuna sweep wrote in the folder
        Doc(kind=SERVER, needs=(OPTUNA,), check=dashboard_lists("gcode-exp-multihead-all")),
    "python run.py -m experiment=baseline,augmented,multihead,multihead_aug seed=0,1,2 hydra/launcher=slurm "
    "hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1 hardware=cuda":
        Doc(kind=COMPOSE, check=slurm_composed),
    "python run.py -m hydra/launcher=submitit_local seed=0,1 trainer.max_epochs=2 hardware.threads=1 "
    "hydra.sweep.dir=/tmp/doc/sub": Doc(jobs=2, check=submitit_job_folders),
    "python run.py -m hparams_search=optuna hydra.sweeper.n_trials=10 hydra.sweep.dir=sweeps/$(hostname)-$$":
        Doc(kind=PG, extra=FEW_TRIALS, jobs=2),
    PG_WORKERS: Doc(kind=PG, extra=FEW_TRIALS, env=({"w": "1"}, {"w": "2"}), jobs=4),
    "python -m gcode_exp.summarize /tmp/doc/pg --storage $GCODE_EXP_OPTUNA_STORAGE --study gcode-exp-multihead-all":
        Doc(kind=PG, needs=(PG_WORKERS,), files=("trials.csv",), check=study_listed("gcode-exp-multihead-all")),
    "python run.py -m hparams_search=optuna hydra.sweeper.n_trials=5 hardware.threads=4 "
    "hydra.sweep.dir=sweeps/${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} data.dir=/shared/recordings":
        Doc(kind=PG, extra=FEW_TRIALS, jobs=2,
            env=({"SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "0"},)),
    # docs/RELIABILITY.md
    "python run.py task=prepare data.dir=DIR data.cache_dir=TMP/cache hydra.run.dir=TMP/run":
        Doc(setup=good_and_damaged, code=2, check=damaged_file_refused, fast=True),
    REAL_PRUNED: Doc(extra=FEW_TRIALS, jobs=2),
    REAL_UNPRUNED: Doc(extra=FEW_TRIALS, jobs=2),
    "python -m gcode_exp.summarize multirun/real-pruned --storage sqlite:///multirun/real-pruned/study.db":
        Doc(needs=(REAL_PRUNED,), files=("trials.csv",), check=study_listed("gcode-exp-multihead-all")),
    "python -m gcode_exp.summarize multirun/real-unpruned --storage sqlite:///multirun/real-unpruned/study.db":
        Doc(needs=(REAL_UNPRUNED,), files=("trials.csv",), check=study_listed("gcode-exp-multihead-all")),
    "python -m gcode_exp.summarize FOLDER": Doc(needs=(EXPERIMENTS,), setup=sweep_with_a_cut_metrics_file,
                                                files=SUMMARY, check=cut_metrics_skipped),
    # docs/RESULTS.md
    REAL_COMPARISON: Doc(jobs=24),
    "python run.py -m experiment=new_programs data.dir=../shared/data/cnc_sensor_gcode features=all,side_channel "
    "seed=0,1,2 hydra.sweep.dir=multirun/real-new-programs": Doc(jobs=6),
    "python run.py -m model=nearest data.dir=../shared/data/cnc_sensor_gcode features=all,side_channel seed=0,1,2 "
    "hydra.sweep.dir=multirun/real-nearest": Doc(jobs=6),
    "python run.py -m model=nearest data.dir=../shared/data/cnc_sensor_gcode features=all,side_channel "
    "data.train_share=0.125,0.25,0.5,1.0 hydra.sweep.dir=multirun/real-nearest-curve": Doc(jobs=8),
    "python run.py data.dir=../shared/data/cnc_sensor_gcode model=nearest features=side_channel":
        Doc(files=("metrics.json",)),
    "python run.py -m model=toolpath data.dir=../shared/data/cnc_sensor_gcode features=all data.split_by=operation "
    "data.fold=0,1,2 hydra.sweep.dir=multirun/real-toolpath-family": Doc(jobs=3),
    "python -m gcode_exp.summarize multirun/real-comparison":
        Doc(needs=(REAL_COMPARISON,), files=SUMMARY, says=("24 run folders (24 finished)",),
            check=summary_rows(*(f"{m}-{a}-v2" for m in ("baseline", "multihead") for a in ("none", "3x")
                                 for _features in ("all", "side_channel")), seeds=3)),
    "python run.py -m experiment=multihead_aug data.dir=../shared/data/cnc_sensor_gcode features=side_channel "
    "features.board_flags=false seed=0,1,2 trainer.max_epochs=40 hydra.sweep.dir=multirun/real-noflags": Doc(jobs=3),
    REAL_OPTUNA: Doc(extra=FEW_TRIALS, jobs=2, check=optuna_trials("gcode-exp-multihead-side_channel")),
    "python -m gcode_exp.summarize multirun/real-optuna/call1 --storage sqlite:///multirun/real-optuna/study.db "
    "--study gcode-exp-multihead-side_channel":
        Doc(needs=(REAL_OPTUNA,), files=("trials.csv",), check=study_listed("gcode-exp-multihead-side_channel")),
    REAL_TOKEN_MODEL: Doc(extra=(*FEW_TRIALS, "trainer.line_exact=true"), jobs=2,
                          check=optuna_trials("gcode-exp-token_model-side_channel")),
    # a fold or two of one feature set here (the documented sweeps hold 60, 18 and 30 jobs)
    REAL_CV: Doc(extra=("data.fold=0,1", "features=side_channel"), jobs=12),
    "python -m gcode_exp.summarize multirun/real-cv --compare new_programs multihead_aug "
    "--compare recommended new_programs":
        Doc(needs=(REAL_CV,), files=(*SUMMARY, "compare.csv"), check=summary_rows(*FOUR, *BEST),
            says=("12 run folders (12 finished)", "Paired comparison recommended - new_programs")),
    REAL_FAMILY: Doc(extra=("experiment=new_programs", "features=side_channel"), jobs=3, check=held_out_families),
    REAL_WINDOW: Doc(extra=("data.fold=0", "features=side_channel"), jobs=6,
                     says=("data.split_by=window: windows of one recording",)),
    "python -m gcode_exp.summarize multirun/real-cv multirun/real-window multirun/real-family":
        Doc(needs=(REAL_CV, REAL_WINDOW, REAL_FAMILY), files=SUMMARY,
            says=("21 run folders (21 finished)", "window 5-fold", "file 5-fold", "operation")),
    CV_DEFAULT: Doc(extra=("data.fold=0,1",), jobs=2),  # 2 of the 5 folds here
    WINDOW_DEFAULT: Doc(extra=("data.fold=0,1",), jobs=2, says=("data.split_by=window: windows of one recording",)),
    "python -m gcode_exp.summarize multirun/real-cv-default multirun/real-window-default":
        Doc(needs=(CV_DEFAULT, WINDOW_DEFAULT), files=SUMMARY,
            says=("4 run folders (4 finished)", "window 5-fold", "file 5-fold")),
    "python -m gcode_exp.bench --data-dir ../shared/data/cnc_sensor_gcode --out docs/bench.json":
        Doc(extra=BENCH_TINY, says=("prepare: cold",), check=bench_json("docs/bench.json")),
    "python -m gcode_exp.bench --scale 1,4,10 --data-dir ../shared/data/cnc_sensor_gcode --out docs/bench_scale.json":
        Doc(text="python -m gcode_exp.bench --scale 1,2 --data-dir DIR --out docs/bench_scale.json",  # 10x: minutes
            extra=BENCH_TINY, says=("add-1 s",), check=scale_json),
}


# --- the runner ----------------------------------------------------------------------------------------
@dataclass
class Ran:
    code: int
    out: str
    err: str
    cwd: Path
    env: dict[str, str]
    folder: Path | None = None                      # run or sweep folder; summarize's first path; else cwd
    jobs: list[Path] = field(default_factory=list)  # a sweep's job folders, in job order
    configs: list[dict] = field(default_factory=list)  # COMPOSE: the composed configs
    http: dict[str, str] = field(default_factory=dict)  # SERVER: path -> the body it answered


class DocSession:
    """The scratch folder all documented commands run in, and what each one left (each runs once)."""

    def __init__(self, ws: Path):
        self.ws = ws
        self.done: dict[str, Ran] = {}
        self.pg_url: str | None = None
        (ws / "doc").mkdir()  # /tmp/doc: the docs' scratch folder (its first command there creates it)
        (ws / "docs").mkdir()  # docs/bench.json lands here, not in the checkout
        (ws / "tmp").mkdir()  # every command's TMPDIR: what one leaves behind is seen, none lands in /tmp
        (ws / "DIR").mkdir()
        for name in ("pocket_016", "pocket_019", "face_003", "face_004", "adaptive_016", "adaptive_017"):
            shutil.copy(SAMPLE / f"{name}_aligned.csv.gz", ws / "DIR")

    def result(self, command: str) -> Ran:
        """What `command` left, running it (and what it needs) first if it has not run yet."""
        if command not in self.done:
            doc = COMMANDS[command]
            for need in doc.needs:
                ran = self.result(need)
                assert ran.code == 0, f"`{command}` needs `{need}`, which exited {ran.code}:\n{ran.err[-2000:]}"
            self.done[command] = run_doc(self, command, doc)
        return self.done[command]


def run_doc(s: DocSession, command: str, doc: Doc) -> Ran:
    """Run one documented command in the session's scratch folder, as the table says."""
    text = doc.text or command
    subs = {"DIR": str(s.ws / "DIR"), **(doc.setup(s) if doc.setup else {})}
    if TOKEN_START in doc.needs and "RUN" not in subs:
        subs["RUN"] = str(s.result(TOKEN_START).folder)
    for key, value in subs.items():
        text = re.sub(rf"\b{key}\b", value, text)
    if "multirun/<date>/<time>" in text:
        text = text.replace("multirun/<date>/<time>", str(s.result(doc.needs[0]).folder))
    for placeholder, value in (("/tmp/doc/", f"{s.ws}/doc/"), ("../shared/data/cnc_sensor_gcode", str(SAMPLE)),
                               ("data/sample/", f"{SAMPLE}/"),
                               ("/shared/recordings", str(SAMPLE)), ("$(hostname)-$$", "doc-host-1")):
        text = text.replace(placeholder, value)
    base_env = {k: v for k, v in os.environ.items() if k not in ("GCODE_EXP_OPTUNA_STORAGE", "GCODE_EXP_DATA")}
    base_env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1", TMPDIR=str(s.ws / "tmp"),
                    PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if doc.kind == PG:
        base_env["GCODE_EXP_OPTUNA_STORAGE"] = s.pg_url

    argv: list[str] = []
    for part in text.rstrip(" &").split(" && "):
        if part.startswith(("python3 -m venv", ".venv/bin/pip install")):
            continue  # the environment the tests run in is that one
        if part.startswith("mkdir -p "):
            for folder in shlex.split(part)[2:]:
                (s.ws / folder).mkdir(parents=True, exist_ok=True)
            continue
        assert not argv and COMMAND.match(part), f"cannot run `{part}` of `{command}`"
        argv = shlex.split(part)
    if doc.kind == SERVER:
        return serve(argv, s.ws, base_env)
    launcher: list[str] = []  # torchrun and its options; argv is then the program it starts
    if argv[0] == "torchrun":
        n = next(i for i, a in enumerate(argv) if i and not a.startswith("-"))
        launcher, argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:n]], ["python", *argv[n:]]
    # run.py, `python -m gcode_exp` and `gcode-exp` are one program: n_prog items name it, the arguments follow
    n_prog = 1 if argv[0] == "gcode-exp" else 3 if argv[1:3] == ["-m", "gcode_exp"] else 2
    app = argv[0] == "gcode-exp" or argv[1] == "run.py" or n_prog == 3
    argv[0] = str(GCODE_EXP) if argv[0] == "gcode-exp" else sys.executable
    if app:
        if argv[1] == "run.py":
            argv[1] = str(ROOT / "run.py")
        given = {a.split("=")[0] for a in argv if "=" in a}
        argv += [o for o in (f"data.dir={SAMPLE}", f"data.cache_dir={s.ws / '.cache'}") if o.split("=")[0] not in given]
        argv = merged(argv, (*tiny_for(argv[n_prog:]), *TINY_RUN)) if doc.kind != COMPOSE else argv
    argv = merged(argv, doc.extra)

    if doc.kind == COMPOSE:
        return compose_only(argv, s.ws, base_env)
    if doc.http:
        return served(merged(argv, ("serve.port=0",)), s.ws, base_env, doc.http)
    before = set(s.ws.glob("outputs/*/*")) | set(s.ws.glob("multirun/*/*"))
    envs = [{**base_env, **e} for e in doc.env]
    cmd = [*launcher, *argv[1:]] if launcher else argv
    procs = [subprocess.Popen([expand(a, e) for a in cmd], cwd=s.ws, env=e, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for e in envs]
    outputs = [p.communicate(timeout=600) for p in procs]
    ran = Ran(max(p.returncode for p in procs), "".join(o for o, _ in outputs), "".join(e for _, e in outputs),
              s.ws, envs[0])

    folders = [Path(expand(a.split("=", 1)[1], e)) for e in envs for a in argv
               if a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    if app:
        new = (set(s.ws.glob("outputs/*/*")) | set(s.ws.glob("multirun/*/*"))) - before
        folders = [s.ws / f for f in folders] or sorted(new)
    elif argv[1:3] == ["-m", "gcode_exp.summarize"]:
        folders = [s.ws / argv[3]]
    ran.folder = folders[0] if folders else s.ws
    if app and "-m" in argv[n_prog : n_prog + 1]:  # a sweep
        ran.jobs = sorted((j for f in folders for j in f.iterdir() if (j / ".hydra").is_dir()),
                          key=lambda j: (str(j.parent), int(j.name.split("_")[0])))
    return ran


def serve(argv: list[str], cwd: Path, env: dict[str, str], paths=("/", "/api/studies"), wait_s: float = 60) -> Ran:
    """A documented server (this environment's `optuna-dashboard`), on a free port of 127.0.0.1: asked
    for each of `paths` until all answer (at most `wait_s`), then stopped (SIGTERM: its Ctrl-C handler
    prints a traceback)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exe = Path(sys.executable).parent / argv[0]
    proc = subprocess.Popen([str(exe), *argv[1:], "--host", "127.0.0.1", "--port", str(port)], cwd=cwd, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    http: dict[str, str] = {}
    deadline = time.monotonic() + wait_s
    try:
        while not http and proc.poll() is None and time.monotonic() < deadline:
            try:
                for path in paths:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
                        http[path] = answer.read().decode()
            except OSError:
                http.clear()
                time.sleep(0.2)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    if len(http) < len(paths):
        return Ran(proc.returncode or 1, out, f"{err}\nno HTTP answer on port {port} within {wait_s} s", cwd, env)
    return Ran(0, out, err, cwd, env, folder=cwd, http=http)


def merged(argv: list[str], extra) -> list[str]:
    """`argv` with every `key=value` of `extra` replacing the same key's value (or added), other items added."""
    keys = {o.split("=")[0] for o in extra if "=" in o}
    return [a for a in argv if not ("=" in a and a.split("=")[0] in keys)] + list(extra)


def expand(arg: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env[m.group(1) or m.group(2)], arg)


def served(argv: list[str], cwd: Path, env: dict[str, str], paths: tuple[str, ...]) -> Ran:
    """task=serve: started, each of `paths` asked for at the address it prints, then stopped with Ctrl-C."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    http: dict[str, str] = {}
    try:
        first = proc.stdout.readline()
        address = re.search(r"on (http://\S+/) ", first)
        for path in paths if address else ():
            with urllib.request.urlopen(address.group(1) + path.lstrip("/"), timeout=30) as answer:
                http[path] = answer.read().decode()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    return Ran(proc.returncode, first + out, err, cwd, env, folder=cwd, http=http)


def compose_only(argv: list[str], cwd: Path, env: dict[str, str]) -> Ran:
    """`--cfg all` cannot go with `-m`: compose once per value of the swept keys (the i-th of each list)."""
    args = [a for a in argv[2:] if a != "-m"]
    lists = [a.split("=", 1)[1].split(",") if "=" in a and "," in a else [None] for a in args]
    ran = Ran(0, "", "", cwd, env)
    for i in range(max(len(v) for v in lists)):
        chosen = [a if v == [None] else f"{a.split('=')[0]}={v[min(i, len(v) - 1)]}" for a, v in zip(args, lists)]
        res = subprocess.run([*argv[:2], *chosen, "--cfg", "all"], cwd=cwd, env=env, text=True, capture_output=True,
                             timeout=120)
        ran.code, ran.out, ran.err = max(ran.code, res.returncode), ran.out + res.stdout, ran.err + res.stderr
        if res.returncode == 0:
            ran.configs.append(yaml.safe_load(res.stdout))
    return ran


# --- the tests -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def docs(tmp_path_factory):
    return DocSession(tmp_path_factory.mktemp("docs"))


@pytest.fixture(scope="session")
def pg_database(pg_url):
    """A fresh database on the server, so the docs' default study names start empty; dropped at the end."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    name = f"gcode_exp_docs_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    yield make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


def test_every_documented_command_is_in_the_table():
    documented = documented_commands()
    missing = [f"{where}: {cmd}" for cmd, where in documented.items() if cmd not in COMMANDS]
    stale = [cmd for cmd in COMMANDS if cmd not in documented]
    assert not missing, "documented commands without an entry in COMMANDS (say how to run and check them):\n" + \
        "\n".join(missing)
    assert not stale, "COMMANDS entries no longer in the docs (remove them):\n" + "\n".join(stale)


def test_every_cited_test_file_exists():
    for doc in [*DOCS, ROOT / ".ci" / "run"]:
        for cited in re.findall(r"tests/[\w/]+\.py", doc.read_text()):
            assert (ROOT / cited).is_file(), f"{doc.relative_to(ROOT)} cites {cited}, which does not exist"


def table_params():
    for command, doc in COMMANDS.items():
        slow = doc.kind in (RUN, PG, SERVER) and not doc.fast
        yield pytest.param(command, marks=[pytest.mark.slow] if slow else [], id=command)


@pytest.mark.parametrize("command", table_params())
def test_documented_command(command, docs, request):
    doc = COMMANDS[command]
    if doc.kind == CI:
        ci = (ROOT / ".ci" / "run").read_text().splitlines()
        assert command in ci, f".ci/run must run the README's test command verbatim: `{command}`"
        return
    if doc.kind == PG and docs.pg_url is None:
        docs.pg_url = request.getfixturevalue("pg_database")  # skips, with the reason, without a server
    code, says, files, check = doc.code, doc.says, doc.files, doc.check
    if doc.kind == CUDA and not torch.cuda.is_available():
        code, says, files, check = 2, ("no such device",), (), None

    ran = docs.result(command)
    assert ran.code == code, f"`{command}` exited {ran.code}, expected {code}; stderr:\n{ran.err[-3000:]}"
    assert "Traceback" not in ran.err, f"`{command}` printed a traceback:\n{ran.err[-3000:]}"
    if doc.kind == CUDA and code == 2:
        lines = ran.err.splitlines()
        assert len(lines) == 1 and "no such device" in lines[0], f"expected one line on stderr, got:\n{ran.err}"
    if doc.kind == COMPOSE:
        from omegaconf import OmegaConf

        from gcode_exp.config_checks import validate

        assert ran.configs, "nothing composed"
        for cfg in ran.configs:
            validate(OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"}))
    if doc.jobs is not None:
        assert len(ran.jobs) == doc.jobs, f"`{command}` left {len(ran.jobs)} job folders, expected {doc.jobs}"
        for job in ran.jobs:
            assert (job / "metrics.json").is_file() and not (job / "error.txt").exists(), f"{job} did not finish"
    for name in files:
        assert (ran.folder / name).exists(), f"`{command}` did not write {name} in {ran.folder}"
    for text in says:
        assert text in ran.out + ran.err, f"`{command}` did not print {text!r}"
    if check is not None:
        check(ran)
