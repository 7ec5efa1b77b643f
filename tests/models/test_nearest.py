"""The nearest-reference model: rows placed by work position, windows by summary + elapsed time."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from gcode_exp.config import ConfigError
from gcode_exp.data.dataset import prepare
from gcode_exp.data.vocab import BOS, EOS, PAD
from gcode_exp.data.windows import Features, Split
from gcode_exp.models.nearest import NearestModel, most_rows
from tests.conftest import run_py

CFG = OmegaConf.create({"name": "nearest", "key": "auto", "motion_weight": 0.3, "elapsed_weight": 50.0})


def line(*ids: int) -> list[int]:
    return [BOS, *ids, EOS] + [PAD] * (6 - len(ids))


def split_of(positions: list[float], texts: list[int], tokens: list[list[int]], window: int) -> Split:
    """One recording moving along x: row i at x=positions[i], executing text texts[i] (its tokens tokens[i])."""
    n = len(positions)
    rows = torch.zeros(n, 3)
    rows[:, 0] = torch.tensor(positions)
    starts = torch.arange(0, n - window + 1, window)
    return Split(rows=rows, starts=starts, lo=torch.zeros_like(starts), hi=torch.full_like(starts, n - window),
                 targets=torch.tensor([tokens[int(s)] for s in starts]), files=["a"], file_windows=[len(starts)],
                 row_targets=torch.tensor(tokens).short(), target_lengths=torch.zeros_like(starts),
                 row_lines=torch.tensor(texts))


def test_most_rows_counts_rows_and_breaks_ties_by_the_first_row():
    assert most_rows(torch.tensor([[3, 3, 1, 1, 1, 2]]), none=9).tolist() == [1]
    assert most_rows(torch.tensor([[2, 5, 5, 2, 0]]), none=9).tolist() == [2]  # 2 and 5 tie: 2 comes first
    assert most_rows(torch.tensor([[7, 7, 7, 7], [9, 9, 9, 4]]), none=9).tolist() == [7, 4]  # rows of none: no vote


def test_position_key_answers_with_the_line_of_most_rows_told_apart_by_text():
    # two texts (ids 11, 12) share their tokens (e.g. numbers in one bucket); a third (13) has its own
    a, b = line(4, 5), line(6, 7)
    train = split_of([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [11, 11, 11, 12, 12, 13, 13, 13, 13, 0],
                     [a, a, a, a, a, b, b, b, b, [PAD] * 8], window=10)
    feats = Features(channels=["posx", "posy", "posz"], boards=[], mean=[0.0] * 3, std=[1.0] * 3)
    model = NearestModel(CFG, max_len=8)
    model.fit(train, feats, window=10)
    assert len(model.lines) == 3  # one per text, the unlabelled row left out
    # a test window at rows 0-8: 3 rows of text 11, 2 of 12, 4 of 13 -> text 13 has the most rows, although
    # the tokens of 11 and 12 together cover 5 rows
    x = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8], dtype=torch.float)[None, :, None].expand(1, 9, 3).clone()
    x[..., 1:] = 0
    answer = model.answer(x)
    assert answer.tokens.tolist() == [b[1:]] and answer.p.tolist() == [1.0]
    assert answer.rows.argmax(-1)[0].tolist() == model.row_lines(x)[0].tolist()  # each row's own answer
    # the motion part of the key tells apart a pass going the other way over the same positions
    assert model.answer(x.flip(1)).tokens.shape == (1, 7)


def test_summary_key_finds_the_same_moment_of_a_training_run():
    window, feats = 4, Features(channels=["x_motor"], boards=[], mean=[0.0], std=[1.0], elapsed=True)
    n = 16
    # rows 100 apart in elapsed time (the input is rows / 1000): far apart, as windows of a long recording are
    rows = torch.stack([torch.randn(n, generator=torch.Generator().manual_seed(0)), torch.arange(n) / 10], 1)
    starts = torch.arange(0, n - window + 1, window)
    tokens = [line(10 + i // window) for i in range(n)]  # window k executes one line, 10 + k
    texts = torch.tensor([100 + i // window for i in range(n)])
    texts[9] = 0  # a row without a line: it votes for nothing
    tokens[9] = [PAD] * 8
    train = Split(rows=rows, starts=starts, lo=torch.zeros_like(starts), hi=torch.full_like(starts, n - window),
                  targets=torch.tensor([line(10 + k) for k in range(len(starts))]), files=["a"],
                  file_windows=[len(starts)], row_targets=torch.tensor(tokens).short(),
                  target_lengths=torch.zeros_like(starts), row_lines=texts)
    model = NearestModel(CFG, max_len=8)
    model.fit(train, feats, window)
    assert model.mode.item() == 1  # summary: the inputs hold no work position
    # other sensor values, but the elapsed time of the third training window: its lines, row by row
    x = torch.stack([torch.zeros(window), (8 + torch.arange(window)) / 10], 1)[None]
    assert model.answer(x).tokens.tolist() == [line(12)[1:]]
    rows_of = model.row_lines(x)[0].tolist()
    assert [model.lines[i].tolist() if i < len(model.lines) else None for i in rows_of] == [line(12), None,
                                                                                         line(12), line(12)]


def test_training_windows_are_answered_with_their_own_targets(tiny_cfg):
    for features in ("all", "side_channel"):
        cfg = tiny_cfg("model=nearest", f"features={features}")
        data = prepare(cfg)
        train = data.splits["train"]
        model = NearestModel(cfg.model, max_len=cfg.data.max_len)
        model.fit(train, data.features, cfg.data.window)
        x = train.rows[train.starts[:, None] + torch.arange(cfg.data.window)]
        hit = (model.answer(x).tokens == train.targets[:, 1:]).all(1).float().mean().item()
        assert model.mode.item() == (0 if features == "all" else 1)
        assert hit >= 0.95, (features, hit)


def test_position_key_needs_position_inputs(tiny_cfg):
    cfg = tiny_cfg("model=nearest", "model.key=position", "features=side_channel")
    data = prepare(cfg)
    with pytest.raises(ConfigError, match="model.key=position"):
        model = NearestModel(cfg.model, max_len=cfg.data.max_len)
        model.fit(data.splits["train"], data.features, cfg.data.window)


@pytest.mark.slow
def test_run_py_fits_evaluates_and_predicts_with_the_nearest_model(tmp_path):
    run = tmp_path / "run"
    res = run_py("model=nearest", f"hydra.run.dir={run}", "trainer.line_exact=true", cache=tmp_path / "c")
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 0 and metrics["n_params"] == 0  # nothing trained
    assert metrics["test/line_exact"] > metrics["majority/line_exact"]
    assert metrics["test/token_macro_recall"] > metrics["majority/token_macro_recall"]
    again = run_py(f"hydra.run.dir={tmp_path / 'eval'}", "task=eval", f"ckpt_path={run / 'checkpoints/best.pt'}",
                   "trainer.line_exact=true", "data.dir=data/sample", cache=tmp_path / "c")
    assert again.returncode == 0, again.stderr[-2000:]
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert scored["test/line_exact"] > 0 and 0 < scored["test/overall_acc"] <= 1
    side = run_py("model=nearest", f"hydra.run.dir={tmp_path / 'side'}", "features=side_channel", cache=tmp_path / "c")
    assert side.returncode == 0 and "(summary)" in side.stdout + side.stderr
    pred = run_py(f"hydra.run.dir={tmp_path / 'pred'}", "task=predict", f"ckpt_path={run / 'checkpoints/best.pt'}",
                  "data.dir=data/sample", cache=tmp_path / "c")
    assert pred.returncode == 0, pred.stderr[-2000:]
    scores = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert scores["predict/row_line_acc"] > scores["majority/row_line_acc"]


def test_the_key_index_finds_the_exact_nearest_key_and_the_first_of_identical_ones():
    """The k-d tree answers what comparing with every key in float64 answers; of identical keys the first, as
    an argmin over all keys would."""
    from gcode_exp.models.nearest import KeyIndex

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3000, 6, generator=g)
    keys[2000:2100] = keys[:100]  # identical keys: the first (0..99) is the answer
    q = torch.cat([torch.randn(500, 6, generator=g), keys[:100] + 1e-9])
    want = torch.cdist(q.double(), keys.double()).argmin(1)
    assert torch.equal(KeyIndex(keys).nearest(q), want)
