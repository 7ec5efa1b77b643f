import math

import pytest
import torch

from gcode_exp.data.vocab import PAD, Vocab
from gcode_exp.training.metrics import (
    command_confusion,
    line_exact,
    macro_recall,
    majority_line,
    majority_metrics,
    per_class,
    token_metrics,
)

V = Vocab.build(["G1 X1", "G0 Z0.5", "G2 X2 Y1 R0.5", "M30"], digits=2)


def ids(*tokens: str) -> list[int]:
    return [V.index[t] for t in tokens]


def seq(line: str, length: int = 8) -> list[int]:
    body = V.encode(line)
    return body + [PAD] * (length - len(body))


def test_hand_made_predictions():
    target = torch.tensor([ids("G1", "X", "NUM_X_00", "EOS"), ids("G0", "Z", "NUM_Z_00", "EOS")])
    pred = torch.tensor([ids("G1", "X", "NUM_X_99", "EOS"), ids("G1", "X", "NUM_Z_00", "EOS")])
    m = token_metrics(pred, target, V)
    assert m["overall_acc"] == pytest.approx(5 / 8)
    assert m["command_acc"] == pytest.approx(1 / 2)
    assert m["type_acc"] == pytest.approx(1.0)
    assert m["param_type_acc"] == pytest.approx(3 / 4)  # X X | Z(pred X) Z
    assert m["param_value_acc"] == pytest.approx(1 / 2)
    assert m["unique_tokens"] == 5  # G1 X NUM_X_99 EOS NUM_Z_00
    assert m["token_coverage"] == pytest.approx(4 / 7)  # G0, Z and NUM_X_00 never predicted
    assert m["command_macro_recall"] == pytest.approx((1 + 0) / 2)
    # per token recall: G1 1, X 1, NUM_X_00 0, EOS 1, G0 0, Z 0, NUM_Z_00 1
    assert m["token_macro_recall"] == pytest.approx(4 / 7)


def test_pad_positions_are_ignored():
    target = torch.tensor([ids("M30", "EOS") + [PAD, PAD]])
    pred = torch.tensor([ids("M30", "EOS", "G1", "G1")])
    assert token_metrics(pred, target, V)["overall_acc"] == 1.0
    assert math.isnan(token_metrics(pred, target, V)["param_value_acc"])


def test_always_majority_token_has_macro_recall_one_over_classes():
    target = torch.tensor([ids("G1"), ids("G1"), ids("G1"), ids("G0"), ids("G2"), ids("M30")])
    pred = torch.full_like(target, V.index["G1"])
    m = token_metrics(pred, target, V)
    assert m["command_acc"] == pytest.approx(3 / 6)
    assert m["command_macro_recall"] == pytest.approx(1 / 4)
    assert m["token_macro_recall"] == pytest.approx(1 / 4)


def test_majority_reference_and_line_exact():
    train = torch.tensor([seq("G1 X1"), seq("G1 X1"), seq("M30")])
    maj = majority_line(train)
    assert maj.tolist() == seq("G1 X1")
    test = torch.tensor([seq("G1 X1"), seq("M30"), seq("G0 Z0.5"), seq("G1 X1")])
    m = majority_metrics(maj, test, V)
    assert m["line_exact"] == pytest.approx(2 / 4)
    assert m["unique_tokens"] == 4  # G1 X NUM_X_00 EOS
    gen = torch.tensor([seq("G1 X1")[1:], seq("M30")[1:]])
    assert line_exact(gen, torch.tensor([seq("G1 X1")[1:], seq("G0 Z0.5")[1:]])) == 0.5


def test_per_class_table_commands_first():
    target = torch.tensor([ids("G1", "X", "NUM_X_00", "EOS"), ids("M30", "EOS", "EOS", "EOS")])
    pred = torch.tensor([ids("G1", "X", "NUM_X_00", "EOS"), ids("G1", "EOS", "EOS", "EOS")])
    rows = per_class(pred, target, V)
    assert [r["type"] for r in rows][:2] == ["COMMAND", "COMMAND"]
    g1 = next(r for r in rows if r["token"] == "G1")
    m30 = next(r for r in rows if r["token"] == "M30")
    assert (g1["support"], g1["predicted"], g1["precision"], g1["recall"]) == (1, 2, 0.5, 1.0)
    assert (m30["support"], m30["recall"]) == (1, 0.0)


def test_macro_recall_skips_a_class_predicted_but_absent_from_the_targets():
    target = torch.tensor([ids("G1", "G1", "G0", "EOS")])
    pred = torch.tensor([ids("G1", "G2", "G0", "EOS")])  # G2 is never a target: not a class of the mean
    m = token_metrics(pred, target, V)
    assert m["command_macro_recall"] == pytest.approx((1 / 2 + 1) / 2)  # G1 1/2, G0 1; not (1/2 + 1 + 0) / 3
    assert m["token_macro_recall"] == pytest.approx((1 / 2 + 1 + 1) / 3)  # G1, G0, EOS
    p, t = pred.flatten(), target.flatten()
    assert macro_recall(p, t, torch.tensor(ids("G1", "G2", "M30"))) == pytest.approx(1 / 2)  # only G1 is present
    assert math.isnan(macro_recall(p, t, torch.tensor(ids("M30"))))


def test_all_pad_targets_give_nan_and_empty_tables():
    target = torch.full((2, 3), PAD)
    pred = torch.tensor([ids("G1", "X", "EOS"), ids("G0", "EOS", "PAD")])
    m = token_metrics(pred, target, V)
    assert m["unique_tokens"] == 0
    assert all(math.isnan(v) for k, v in m.items() if k != "unique_tokens")
    assert per_class(pred, target, V) == []
    assert command_confusion(pred, target, V).tolist() == [[0] * 5] * 4


def test_one_class_only():
    target = torch.tensor([ids("G1")] * 3)
    m = token_metrics(target, target, V)
    assert (m["overall_acc"], m["command_macro_recall"], m["token_macro_recall"], m["unique_tokens"]) == (1, 1, 1, 1)
    assert token_metrics(torch.full_like(target, V.index["G0"]), target, V)["token_macro_recall"] == 0.0
    assert per_class(target, target, V) == [
        {"token": "G1", "type": "COMMAND", "support": 3, "predicted": 3, "precision": 1.0, "recall": 1.0}]


def test_per_class_counts_only_non_pad_positions_and_lists_only_target_tokens():
    target = torch.tensor([ids("G0", "Z", "EOS", "PAD"), ids("G0", "X", "EOS", "PAD")])
    pred = torch.tensor([ids("G1", "Z", "EOS", "G0"), ids("G0", "Z", "X", "G0")])  # G0 at a PAD target: not counted
    rows = {r["token"]: r for r in per_class(pred, target, V)}
    assert list(rows) == ["G0", "EOS", "X", "Z"]  # commands first, then by id; G1 is never a target
    assert rows["G0"] == {"token": "G0", "type": "COMMAND", "support": 2, "predicted": 1, "precision": 1.0,
                          "recall": 0.5}
    assert (rows["X"]["predicted"], rows["X"]["precision"], rows["X"]["recall"]) == (1, 0.0, 0.0)  # once, at an EOS
    assert (rows["Z"]["support"], rows["Z"]["predicted"], rows["Z"]["precision"]) == (1, 2, 0.5)
    assert (rows["EOS"]["support"], rows["EOS"]["predicted"], rows["EOS"]["recall"]) == (2, 1, 0.5)


def test_per_class_precision_of_a_token_never_predicted_is_zero():
    target = torch.tensor([ids("G0", "EOS"), ids("G1", "EOS")])
    pred = torch.tensor([ids("G1", "EOS"), ids("G1", "EOS")])
    g0 = per_class(pred, target, V)[0]
    assert (g0["token"], g0["predicted"], g0["precision"], g0["recall"]) == ("G0", 0, 0.0, 0.0)


def test_command_confusion_rows_are_target_commands_and_the_last_column_any_other_prediction():
    target = torch.tensor([ids("G0", "X", "EOS"), ids("G0", "Z", "EOS"), ids("M30", "EOS", "PAD")])
    pred = torch.tensor([ids("G0", "G1", "EOS"), ids("X", "Z", "EOS"), ids("G2", "EOS", "G1")])
    # columns G0 G1 G2 M30 other; non-command targets (X predicted G1, the PAD predicted G1) are not counted
    assert command_confusion(pred, target, V).tolist() == [
        [1, 0, 0, 0, 1],  # G0: once right, once predicted X
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0],  # M30 predicted G2
    ]
