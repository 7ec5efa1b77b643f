"""Many workers, one Optuna study in PostgreSQL (the real server; CI starts one with .ci/postgres.sh)."""

import os
import subprocess
import sys
import uuid

import optuna
import pytest

from gcode_exp import summarize
from tests.conftest import ROOT, SAMPLE, TINY

PG_URL = os.environ.get("GCODE_EXP_PG_URL")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PG_URL, reason="no PostgreSQL server: set GCODE_EXP_PG_URL (`bash .ci/postgres.sh start`)"),
]


def test_two_concurrent_workers_share_one_study(tmp_path):
    study = f"test-{uuid.uuid4().hex[:8]}"
    optuna.storages.RDBStorage(PG_URL)  # tables once per new database (docs/SWEEPS.md); the study itself
    # does not exist yet: the two workers race to create it
    workers = []
    for w in ("w0", "w1"):
        cmd = [sys.executable, str(ROOT / "run.py"), "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2",
               f"optuna_storage={PG_URL}", f"hydra.sweeper.study_name={study}", f"hydra.sweep.dir={tmp_path / w}",
               f"data.dir={SAMPLE}", f"data.cache_dir={tmp_path / 'cache'}", *TINY, "trainer.line_exact=false"]
        workers.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in workers]
    assert [p.returncode for p in workers] == [0, 0], outputs[0][-1500:] + outputs[1][-1500:]
    trials = optuna.load_study(study_name=study, storage=PG_URL).trials
    try:
        assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # the sum of both workers' n_trials, each once
        assert all(t.state.name == "COMPLETE" for t in trials)
        rows = summarize.study_trials(PG_URL, study, summarize.find_runs([tmp_path]))
        folders = [r["folder"] for r in rows]
        assert "-" not in folders and len(set(folders)) == 4  # every trial wrote its own folder
        assert {f.split("/")[-2] for f in folders} == {"w0", "w1"}
    finally:
        optuna.delete_study(study_name=study, storage=PG_URL)
