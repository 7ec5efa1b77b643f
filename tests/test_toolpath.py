"""The toolpath model rebuilds lines from a path sampled like the controller samples it: at a fixed pace
per row, so a line's end falls between rows. Paths here are drawn from known G-code geometry (passes joined
by arcs, filleted and sharp corners, short moves), sampled at a pace that is not a divisor of any move."""

import numpy as np
import pytest
from omegaconf import OmegaConf

from gcode_exp.config import ConfigError
from gcode_exp.data.vocab import parse_line
from gcode_exp.data.windows import Features
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


def test_sharp_corners_end_at_the_corner_and_keep_the_mode():
    """A triangle with sharp corners, sampled so that no row is on a corner: each side ends on its corner
    (where the sides' lines meet), in the same mode (no G word), with the axes that change."""
    a, b, c = [0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [1.0, 1.5, 0.0]
    path = sampled(np.concatenate([line(a, b), line(b, c), line(c, a)]), pace=0.11)
    texts = reconstruct(path, CFG)
    on_ab = [i for i, p in enumerate(path) if abs(p[1]) < 1e-9 and 0.3 < p[0] < 1.7]
    on_bc = [i for i, p in enumerate(path) if 0.3 < p[1] < 1.2 and abs(p[1] - 1.5 * (2 - p[0])) < 1e-9]
    assert on_ab and on_bc
    for i in on_ab:
        assert texts[i] == "X2.0000", texts[i]
    for i in on_bc:
        w = words(texts[i])
        assert set(w) == {"X", "Y"}, texts[i]
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
