"""model=rocket: random convolution features and a ridge over whole lines, a peer in the model interface."""

import json

import pytest
import torch
import torch.nn.functional as F

from gcode_exp.data.dataset import prepare
from gcode_exp.models.base import Windows
from gcode_exp.models.rocket import KERNELS, RocketModel, dilations, ridge
from tests.conftest import run_py


def test_the_kernels_and_dilations_are_minirockets():
    assert KERNELS.shape == (84, 9) and set(KERNELS.sum(1).tolist()) == {0.0}  # six -1s and three 2s each
    assert dilations(64) == [1, 2, 3, 4, 5, 7]  # up to where a kernel of 9 spans the window
    assert dilations(9) == [1]


def solve(f: torch.Tensor, target: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge by its normal equations, the intercept unpenalised: the textbook answer."""
    fm, tm = f.mean(0), target.mean(0)
    fc = f - fm
    coef = torch.linalg.solve(fc.T @ fc + a * torch.eye(f.shape[1], dtype=f.dtype), fc.T @ (target - tm))
    return coef, tm - fm @ coef


def test_ridge_is_the_textbook_fit_at_the_penalty_left_out_recordings_prefer():
    g = torch.Generator().manual_seed(0)
    groups = torch.arange(8).repeat_interleave(30)
    y = torch.randint(3, (len(groups),), generator=g)
    f = torch.randn(len(y), 40, generator=g, dtype=torch.float64)
    f[:, 0] += y  # feature 0 carries the class, weakly; the rest is noise
    target, alphas = F.one_hot(y, 3).double(), [1e-2, 1.0, 30.0, 1e3]
    right = []
    for a in alphas:  # held-out accuracy over 4 folds of whole recordings (recording r in fold r % 4)
        hits = 0
        for k in range(4):
            out = groups % 4 == k
            coef, intercept = solve(f[~out], target[~out], a)
            hits += int(((f[out] @ coef + intercept).argmax(1) == y[out]).sum())
        right.append(hits)
    best = max(range(len(alphas)), key=lambda i: (right[i], alphas[i]))
    coef, intercept, alpha = ridge(f.float(), y, 3, alphas, groups)
    assert float(alpha) == alphas[best]
    want_coef, want_intercept = solve(f.float().double(), target, alphas[best])
    assert torch.allclose(coef.double(), want_coef, atol=1e-4) and torch.allclose(intercept.double(), want_intercept,
                                                                                  atol=1e-4)


def test_fits_the_sample_better_than_its_majority_line_and_survives_its_own_state(tiny_cfg):
    cfg = tiny_cfg("model=rocket", "model.features=500")
    data = prepare(cfg)
    train = data.splits["train"]
    model = RocketModel(cfg.model, max_len=cfg.data.max_len)
    model.fit(train, data.features, cfg.data.window)
    answer = model.predict(Windows.of_split(train, cfg.data.window))
    hit = (answer.tokens == train.targets[:, 1:]).all(1).float().mean().item()
    majority = (F.one_hot(torch.unique(train.targets, dim=0, return_inverse=True)[1]).sum(0).max() / len(train)).item()
    assert hit > majority + 0.2, (hit, majority)
    assert ((answer.p >= 0) & (answer.p <= 1)).all()
    again = RocketModel(cfg.model, max_len=cfg.data.max_len)
    again.load_state(model.state())  # a checkpoint's tensors, no pickled object
    same = again.predict(Windows.of_split(train, cfg.data.window))
    assert torch.equal(same.tokens, answer.tokens) and torch.allclose(same.p, answer.p)


@pytest.mark.slow
def test_run_py_fits_and_predicts_with_the_rocket_model(tmp_path):
    run = tmp_path / "run"
    res = run_py("model=rocket", "model.features=500", f"hydra.run.dir={run}", cache=tmp_path / "c")
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 0 and metrics["n_params"] == 0 and "rocket" in (run / "run.log").read_text()
    pred = run_py(f"hydra.run.dir={tmp_path / 'pred'}", "task=predict", f"ckpt_path={run / 'checkpoints/best.pt'}",
                  "data.dir=data/sample", cache=tmp_path / "c")
    assert pred.returncode == 0, pred.stderr[-2000:]
    scores = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert 0 < scores["predict/row_line_acc"] <= 1
