"""The toolpath model rebuilds lines from a path sampled like the controller samples it: at a fixed pace
per row, so a line's end falls between rows. Paths here are drawn from known G-code geometry (passes joined
by arcs, filleted and sharp corners, short moves), sampled at a pace that is not a divisor of any move."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from gcode_exp.config import ConfigError
from gcode_exp.data.vocab import Vocab, parse_line
from gcode_exp.data.windows import Features, Split, encode_rows
from gcode_exp.models import Windows
from gcode_exp.models.toolpath import ToolpathModel, reconstruct
from tests.conftest import ROOT

CFG = OmegaConf.load(ROOT / "conf" / "model" / "toolpath.yaml")


def sampled(points: np.ndarray, pace: float, offset: float = 0.05) -> np.ndarray:
    """A densely drawn path [n, 3] -> the places a machine moving `pace` per row is at, row by row."""
    length = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    at = np.arange(offset, length[-1], pace)
    return np.stack([np.interp(at, length, points[:, k]) for k in range(3)], 1)


def line(a, b, n=400) -> np.ndarray:
    return np.linspace(a, b, n)


def arc(centre, radius, start_deg, end_deg, n=200) -> np.ndarray:
    t = np.radians(np.linspace(start_deg, end_deg, n))
    return np.stack([centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t), np.zeros(n)], 1)


def words(text: str) -> dict[str, float]:
    return dict(parse_line(text)[0])


def test_passes_joined_by_half_circles_end_where_the_circles_start():
    """A facing zigzag: passes along X between x=0 and x=3, 0.2 apart, joined by half circles (G2/G3): each
    pass is `G1 X3` or `G1 X0`, only X written, though no row falls at either end."""
    r, pieces, y = 0.1, [], 0.0
    for k in range(4):
        a, b = (0.0, 3.0) if k % 2 == 0 else (3.0, 0.0)
        pieces.append(line([a, y, 0], [b, y, 0]))
        if k < 3:
            pieces.append(arc([b, y + r], r, -90, 90) if k % 2 == 0 else arc([b, y + r], r, 270, 90))
        y += 2 * r
    path = sampled(np.concatenate(pieces), pace=0.17)
    path = np.concatenate([path, np.repeat([[0.0, y - 2 * r, 0.0]], 5, axis=0)])  # standing at the end, as jobs end
    texts = reconstruct(path, CFG)
    passes = [i for i, p in enumerate(path) if abs(p[1] - round(p[1] / 0.2) * 0.2) < 1e-9 and 0.3 < p[0] < 2.7]
    assert len(passes) > 40
    for i in passes:
        w = words(texts[i])
        assert set(w) == {"X"} or set(w) == {"G", "X"}, texts[i]
        assert w["X"] == pytest.approx(3.0 if path[i + 1][0] > path[i][0] else 0.0, abs=0.005), texts[i]
        assert ("G" in w) == (path[i][1] > 0.1), texts[i]  # after an arc the mode is G1 again; the first pass not


@pytest.mark.parametrize("pace", [0.13, 0.17, 0.23])
def test_a_filleted_rectangle_ends_each_side_where_its_fillet_begins(pace):
    """A rectangle 3 x 2 with corners rounded by r=0.07: each side ends 0.07 before the corner, whether or
    not a row falls on the fillet (read from the fillet's samples or from the path per row)."""
    r, w, h = 0.07, 3.0, 2.0
    path = sampled(np.concatenate([
        line([r, 0, 0], [w - r, 0, 0]), arc([w - r, r], r, -90, 0),
        line([w, r, 0], [w, h - r, 0]), arc([w - r, h - r], r, 0, 90),
        line([w - r, h, 0], [r, h, 0]), arc([r, h - r], r, 90, 180),
        line([0, h - r, 0], [0, r, 0])]), pace=pace)
    texts = reconstruct(path, CFG)
    for i, p in enumerate(path):
        if abs(p[1] - 0) < 1e-9 and 0.5 < p[0] < w - 0.5:
            assert words(texts[i])["X"] == pytest.approx(w - r, abs=0.01), texts[i]
        if abs(p[0] - w) < 1e-9 and 0.5 < p[1] < h - 0.5:
            assert words(texts[i])["Y"] == pytest.approx(h - r, abs=0.01), texts[i]
            assert texts[i].startswith("G1 "), texts[i]
        if abs(p[1] - h) < 1e-9 and 0.5 < p[0] < w - 0.5:
            assert words(texts[i])["X"] == pytest.approx(r, abs=0.01), texts[i]


@pytest.mark.parametrize("g_after", [["arc", "corner", "mode"], ["arc", "mode"]])
def test_sharp_corners_end_at_the_corner(g_after):
    """A triangle with sharp corners, sampled so that no row is on a corner: each side ends on its corner
    (where the sides' lines meet) with the axes that change, and says G1 where `model.g_after` names
    corners (the first side: nothing before it)."""
    a, b, c = [0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [1.0, 1.5, 0.0]
    path = sampled(np.concatenate([line(a, b), line(b, c), line(c, a)]), pace=0.11)
    texts = reconstruct(path, OmegaConf.merge(CFG, {"g_after": g_after}))
    on_ab = [i for i, p in enumerate(path) if abs(p[1]) < 1e-9 and 0.3 < p[0] < 1.7]
    on_bc = [i for i, p in enumerate(path) if 0.3 < p[1] < 1.2 and abs(p[1] - 1.5 * (2 - p[0])) < 1e-9]
    assert on_ab and on_bc
    for i in on_ab:
        assert texts[i] == "X2.0000", texts[i]
    for i in on_bc:
        w = words(texts[i])
        assert set(w) == ({"G", "X", "Y"} if "corner" in g_after else {"X", "Y"}), texts[i]
        assert (w["X"], w["Y"]) == pytest.approx((1.0, 1.5), abs=1e-3), texts[i]


def test_short_moves_are_each_a_line_ending_at_its_row():
    """A descending spiral of moves shorter than a row (as a pocket's helix): every row is its own line,
    at the row, with the axes that changed since the row before."""
    t = np.arange(200) * 0.3
    path = np.stack([1 + 0.2 * np.cos(t), 1 + 0.2 * np.sin(t), 0.5 - 0.002 * np.arange(200)], 1)
    texts = reconstruct(path, CFG)
    for i in range(1, 200):
        w, moved = words(texts[i]), abs(path[i] - path[i - 1]) > CFG.still
        assert set(w) == {axis for axis, m in zip("XYZ", moved, strict=True) if m}
        assert [w[axis] for axis in w] == pytest.approx([path[i]["XYZ".index(axis)] for axis in w], abs=6e-5)
        assert moved.sum() >= 2


def test_a_standing_machine_has_no_line_and_without_the_position_the_model_is_refused():
    path = np.zeros((10, 3))
    assert reconstruct(path, CFG) == [""] * 10
    side = Features(channels=["x_motor", "y_motor"], boards=[], mean=[0.0, 0.0], std=[1.0, 1.0])
    with pytest.raises(ConfigError, match="model=toolpath: needs the inputs posx"):
        ToolpathModel(CFG, vocab=None, max_len=8).fit(None, side, window=8)


def facing(x0: float, x1: float, step: float, passes: int, pace: float, says_g1: bool = True
           ) -> tuple[np.ndarray, list[str]]:
    """A facing job as a controller logs it: rows [n, 4] (work position, feed rate) and each row's line: the
    half circles' lines G3/G2, each pass after one saying G1 (the shared programs' style) or not; idle rows
    before and after it."""
    r, pieces, texts, y = step / 2, [], [], 0.0
    for k in range(passes):
        a, b = (x0, x1) if k % 2 == 0 else (x1, x0)
        pieces.append(line([a, y, 0], [b, y, 0]))
        texts.append(f"{'G1 ' if k and says_g1 else ''}X{b:.4f}")
        if k < passes - 1:
            pieces.append(arc([b, y + r], r, -90, 90) if k % 2 == 0 else arc([b, y + r], r, 270, 90))
            texts.append(f"{'G3' if k % 2 == 0 else 'G2'} X{b:.4f} Y{y + step:.4f} R{r:.4f}")
        y += step
    drawn = np.concatenate(pieces)
    which = np.repeat(np.arange(len(pieces)), [len(p) for p in pieces])
    length = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(drawn, axis=0), axis=1))])
    at = np.arange(0.05, length[-1], pace)
    rows = np.stack([np.interp(at, length, drawn[:, k]) for k in range(3)], 1)
    lines = [texts[which[min(np.searchsorted(length, s), len(drawn) - 1)]] for s in at]
    job = np.concatenate([rows, np.full((len(rows), 1), 1016.0)], 1)
    # before and after, the machine stands idle (feed 0) and the controller reports the program's end
    before, after = np.repeat([[*rows[0], 0.0]], 20, axis=0), np.repeat([[*drawn[-1], 0.0]], 40, axis=0)
    return np.concatenate([before, job, after]), ["M30"] * 20 + lines + ["M30"] * 40


def as_split(jobs: list[tuple[np.ndarray, list[str]]], vocab: Vocab, window: int, max_len: int = 12) -> Split:
    rows, targets, line_ids, starts, lo, hi, offset = [], [], [], [], [], [], 0
    number: dict[str, int] = {}  # each text's line id (0: none)
    for x, texts in jobs:
        n = len(x)
        rows.append(torch.tensor(x, dtype=torch.float32))
        targets.append(torch.from_numpy(encode_rows(texts, vocab, max_len)))
        line_ids.append(torch.tensor([number.setdefault(t, len(number) + 1) for t in texts]))
        s = torch.arange(0, n - window + 1, window // 2)
        starts.append(offset + s)
        lo.append(torch.full_like(s, offset))
        hi.append(torch.full_like(s, offset + n - window))
        offset += n
    row_targets, starts_ = torch.cat(targets), torch.cat(starts)
    # a window's target: the line with most of its rows (first first), as data.target=longest makes it
    per_window = []
    for s in starts_.tolist():
        ids = torch.cat(line_ids)[s : s + window].tolist()
        best = max(ids, key=lambda i: (ids.count(i), -ids.index(i)))
        per_window.append(row_targets[s + ids.index(best)].long())
    return Split(rows=torch.cat(rows), starts=starts_, lo=torch.cat(lo), hi=torch.cat(hi),
                 targets=torch.stack(per_window), files=[str(i) for i in range(len(jobs))],
                 file_windows=[len(s) for s in starts], row_targets=row_targets,
                 target_lengths=torch.zeros_like(starts_), row_lines=torch.cat(line_ids))


@pytest.mark.parametrize("says_g1", [True, False])
def test_a_program_never_seen_is_read_line_by_line(says_g1):
    """Fitted on one facing job, the model answers the windows of another job it never saw (other extents,
    stepover and pace) with their exact lines, writing G1 after an arc where `model.g_after` says the
    program does, and the line the training job's idle rows report (M30) for the idle ones."""
    train_job = facing(0.0, 3.0, 0.2, 6, pace=0.17, says_g1=says_g1)
    new_job = facing(0.4, 2.2, 0.3, 5, pace=0.13, says_g1=says_g1)
    vocab = Vocab.build(train_job[1] + new_job[1], digits=2)
    feats = Features(channels=["feed", "posx", "posy", "posz"], boards=[], mean=[0.0] * 4, std=[1.0] * 4)
    to_inputs = [3, 0, 1, 2]  # feats.channels order: feed first
    train = as_split([(train_job[0][:, to_inputs], train_job[1])], vocab, window=32)
    test = as_split([(new_job[0][:, to_inputs], new_job[1])], vocab, window=32)
    cfg = OmegaConf.merge(CFG, {"g_after": ["arc", "mode"] if says_g1 else ["mode"]})
    model = ToolpathModel(cfg, vocab=vocab, max_len=12)
    model.fit(train, feats, window=32)
    answer = model.predict(Windows.of_split(test, 32))
    exact = (answer.tokens == test.targets[:, 1:]).all(1)
    assert exact.float().mean() >= 0.9, [vocab.decode(t) for t in answer.tokens[:4].tolist()]
    idle = torch.tensor([vocab.decode(t[1:].tolist()) == "M30" for t in test.targets])
    assert idle.sum() >= 2 and exact[idle].all()
