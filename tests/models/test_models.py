import pytest
import torch
from hydra import compose, initialize_config_dir

from gcode_exp.data.vocab import BOS, EOS, PAD, UNK, Vocab
from gcode_exp.models import build_model
from tests.conftest import ROOT

V = Vocab.build(["G1 X1 Y2", "G0 Z0.5", "G2 X2 Y1 R0.5", "M30", "X0 Y0"], digits=2)
SMALL = ["model.d_model=32", "model.dec_layers=1", "model.n_heads=2", "model.dropout=0.0", "model.row_weight=0.0"]


def model_cfg(name: str, encoder: str = "conv", *extra: str):
    """The model config as conf/ composes it (its class and its encoder's are named there), small."""
    with initialize_config_dir(config_dir=str(ROOT / "conf")):
        return compose("config", overrides=[f"model={name}", f"model/encoder={encoder}", *SMALL, *extra]).model


def make(name: str, encoder: str = "conv"):
    torch.manual_seed(0)
    return build_model(model_cfg(name, encoder), V, n_inputs=7, window=16, max_len=8)


@pytest.mark.parametrize("name,encoder", [("baseline", "conv"), ("multihead", "conv"), ("multihead", "lstm")])
def test_shapes_loss_and_generation(name, encoder):
    model = make(name, encoder)
    x, tokens = torch.randn(3, 16, 7), torch.tensor([V.encode("G1 X1 Y2")[:8]] * 3)
    out = model(x, tokens[:, :-1])
    pred = model.token_ids(out)
    assert pred.shape == (3, 6) and pred.dtype == torch.long
    loss, parts = model.loss(out, tokens[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and parts
    model.eval()
    answer = model.answer(x)
    assert answer.tokens.shape == (3, 7) and answer.p.shape == (3,) and ((0 < answer.p) & (answer.p <= 1)).all()
    ended = (answer.tokens == EOS).cumsum(1) > 0  # after its EOS a sequence holds only PAD
    assert (answer.tokens[ended & (answer.tokens != EOS)] == PAD).all()


def test_multihead_heads_and_composition():
    model = make("multihead")
    out = model(torch.randn(2, 16, 7), torch.tensor([[BOS, 0, 0], [BOS, 0, 0]]))
    assert out["type"].shape[-1] == 4
    assert out["command"].shape[-1] == len(V.commands)
    assert out["param_type"].shape[-1] == len(V.letters)
    assert out["param_value"].shape[-1] == 100

    def onehot(n, i):
        return torch.nn.functional.one_hot(torch.tensor([[i]]), n).float()

    def compose(kind, cmd=0, letter=0, value=0):
        return model.token_ids({
            "type": onehot(4, kind), "command": onehot(len(V.commands), cmd),
            "param_type": onehot(len(V.letters), letter), "param_value": onehot(100, value),
        }).item()

    assert compose(0) == EOS
    assert V.tokens[compose(1, cmd=V.commands.index("G2"))] == "G2"
    assert V.tokens[compose(2, letter=V.letters.index("R"))] == "R"
    b = int(V.line_tokens("X2")[1].split("_")[2])
    assert V.tokens[compose(3, letter=V.letters.index("X"), value=b)] == f"NUM_X_{b:02d}"
    assert compose(3, letter=V.letters.index("R"), value=42) == UNK  # a bucket never seen in training


def test_multihead_loss_weights_scale_the_command_head():
    model = make("multihead")
    x, tokens = torch.randn(2, 16, 7), torch.tensor([V.encode("G1 X1 Y2")[:8]] * 2)
    out = model(x, tokens[:, :-1])
    total, parts = model.loss(out, tokens[:, 1:])
    expected = parts["type"] + 3.0 * parts["command"] + parts["param_type"] + parts["param_value"]
    assert total.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("encoder", ["conv", "lstm"])
def test_row_head_labels_every_row_and_adds_its_loss(encoder):
    def padded(text):
        return V.encode(text) + [0] * (8 - len(V.encode(text)))

    lines = torch.tensor([padded("G1 X1 Y2"), padded("G0 Z0.5")])
    torch.manual_seed(0)
    cfg = model_cfg("multihead", encoder, "model.row_weight=2.0")
    model = build_model(cfg, V, n_inputs=7, window=16, max_len=8, lines=lines)
    # rows: line 1, line 0, a line that is no window's target, an unlabelled row (all PAD)
    row_targets = torch.stack([lines[1], lines[0], torch.tensor(padded("M30")), torch.zeros(8)]).short()
    assert model.row_labels(row_targets).tolist() == [1, 0, 2, -1]
    x, tokens = torch.randn(3, 16, 7), lines[[0, 1, 0]]
    out = model(x, tokens[:, :-1])
    assert out["rows"].shape == (3, 16, 3)  # one class per line, plus "another line"
    rows = torch.randint(-1, 3, (3, 16))
    total, parts = model.loss(out, tokens[:, 1:], rows)
    tokens_only, _ = model.loss(out, tokens[:, 1:])
    assert total.item() == pytest.approx(tokens_only.item() + 2.0 * parts["rows"], rel=1e-5)
    without = build_model(model_cfg("multihead", encoder), V, n_inputs=7, window=16, max_len=8, lines=lines)
    assert "rows" not in without(x, tokens[:, :-1]) and without.row_labels(row_targets) is None
