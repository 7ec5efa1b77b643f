import pytest

from gcode_exp.data.vocab import BOS, COMMAND, EOS, NUMERIC, PARAMETER, UNK, Vocab, parse_line

LINES = ["G0 Z0.6", "G1 X-0.1254 Y2.5 F40.", "X3.275 Y0.3746 R0.083", "G2 X1 Y-0.2 R0.5", "M30", "G53 Z0."]


def test_parse_handles_trailing_dots_comments_and_line_numbers():
    words, dropped = parse_line("N10 G1 X1. Z-.5 (rapid) F40. ; tail comment")
    assert words == [("G", 1.0), ("X", 1.0), ("Z", -0.5), ("F", 40.0)]
    assert dropped == 0
    assert parse_line("G1 X1 #5 Y2")[1] == 1  # an unparseable chunk is dropped and counted


def test_vocab_types_and_no_upstream_quirks():
    v = Vocab.build(LINES, digits=2)
    assert v.tokens[:4] == ["PAD", "BOS", "EOS", "UNK"]
    assert {"G0", "G1", "G2", "G53", "M30"} <= set(v.commands)
    assert set(v.letters) == {"X", "Y", "Z", "F", "R"}
    # trailing-dot values are numbers, never parameter tokens such as `Z0.` or `F40.`
    assert not any("." in t for t in v.tokens)
    assert all(v.token_type(t) == NUMERIC for t in v.tokens if t.startswith("NUM_"))
    s = v.structure()
    assert s["type"][v.index["G1"]] == COMMAND and s["type"][v.index["X"]] == PARAMETER
    assert s["bucket"][v.index["NUM_X_00"]] == 0 and s["letter"][v.index["NUM_X_00"]] == v.letters.index("X")


@pytest.mark.parametrize("digits", [2, 4])
def test_round_trip_within_half_a_bucket(digits):
    v = Vocab.build(LINES, digits=digits)
    for line in LINES:
        ids = v.encode(line)
        assert ids[0] == BOS and ids[-1] == EOS and UNK not in ids
        decoded = parse_line(v.decode(ids[1:]))[0]
        original = parse_line(line)[0]
        assert [w[0] for w in decoded] == [w[0] for w in original]
        for (letter, got), (_, want) in zip(decoded, original):
            if letter in "GM":
                assert got == want
            else:
                lo, hi = v.ranges[letter]
                assert abs(got - want) <= (hi - lo) / 10**digits / 2 + 1e-4


def test_sign_and_magnitude_are_kept():
    v = Vocab.build(["X-1", "X1", "X10", "X-10"], digits=2)
    tokens = {x: v.line_tokens(f"X{x}")[1] for x in (-10, -1, 1, 10)}
    assert len(set(tokens.values())) == 4  # -1 and 1, 1 and 10 stay apart


def test_v1_is_finer_and_larger_than_v2():
    lines = [f"G1 X{x / 1000:.3f} Y{-x / 500:.3f}" for x in range(2000)]
    assert len(Vocab.build(lines, 4)) > 3 * len(Vocab.build(lines, 2))


def test_unknown_letter_and_out_of_range_values():
    v = Vocab.build(LINES, digits=2)
    assert v.line_tokens("G1 Q5") == ["G1", "UNK", "UNK"]
    assert v.line_tokens("X99")[1] == "NUM_X_99"  # beyond the training range: edge bucket
    assert v.encode("G7 X1")[1] == UNK  # a command never seen in training


def test_json_round_trip(tmp_path):
    v = Vocab.build(LINES, digits=2)
    v.save(tmp_path / "vocab.json")
    import json

    w = Vocab.from_dict(json.loads((tmp_path / "vocab.json").read_text()))
    assert w.tokens == v.tokens and w.ranges == v.ranges
    assert w.encode("G1 X-0.1254 Y2.5") == v.encode("G1 X-0.1254 Y2.5")


def test_one_far_coordinate_does_not_widen_every_bucket():
    """A typo'd X999 among a part's X values (0 .. 3.8): left out of X's range, named in a warning, and read
    as the edge bucket; without it the 100 buckets would each be ~10 wide and every real X one bucket.
    Few values (F: 4 feeds) are never judged: a gap between few values is no evidence of a typo."""
    lines = [f"G1 X{0.2 * i:.1f} Y{0.1 * i:.1f} F{f}" for i, f in zip(range(20), [7.3, 13.3, 22.0, 40.0] * 5)]
    vocab = Vocab.build([*lines, "G1 X999", "G1 Y-500"], digits=2)
    assert vocab.ranges["X"] == (0.0, 3.8) and vocab.ranges["Y"] == (0.0, 1.9) and vocab.ranges["F"] == (7.3, 40.0)
    assert vocab.left_out == {"X": [999.0], "Y": [-500.0]}
    assert vocab.range_notes()[0].startswith("vocab: X value 999 lie far beyond every other X (0 .. 3.8)")
    assert vocab.decode(vocab.encode("G1 X999")[1:-1]) == vocab.decode(vocab.encode("G1 X3.8")[1:-1])
    assert len({vocab.encode(line)[3] for line in lines}) == 20, "every real X keeps a bucket of its own"  # NUM_X_..
    assert Vocab.build(lines, digits=2).left_out == {}
