import json

import pytest

from gcode_exp import bench
from tests.conftest import SAMPLE, TINY


@pytest.mark.slow
def test_bench_prints_and_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    overrides = [o for o in TINY if o.startswith(("data.", "model.", "++model."))]
    result = bench.main(["--data-dir", str(SAMPLE), "--steps", "2", "--out", str(out), *overrides])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result["models"]) == {"baseline", "multihead", "new_programs"}
    for m in result["models"].values():
        assert m["bare_windows_per_s"] > 0 and m["pipeline_windows_per_s"] > 0
        assert m["latency_ms_batch1"] > 0 and m["latency_ms_per_window_batch256"] > 0 and m["live_ms_per_window"] > 0
    assert result["prepare_cold_s"] > result["prepare_cached_s"] > 0
    assert set(result["epoch_s_by_data_size"]) == {"1x", "2x", "4x"} and result["peak_rss_mb"] > 0
    nearest = result["nearest"]  # the default model: a reference built, not trained
    assert nearest["reference_keys"] > 0 and nearest["fit_s"] > 0 and nearest["latency_ms_per_window_batch256"] > 0
    printed = capsys.readouterr().out
    assert "prepare: cold" in printed and "default" in printed and "4x/1x" in printed
