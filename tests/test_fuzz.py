"""Property tests: the tokenizer and the CSV reader never crash on odd input."""

import gzip

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gcode_exp.data.read import DataError, read_run
from gcode_exp.data.vocab import UNK, Vocab, parse_line
from tests.conftest import SAMPLE

LETTERS = "GMXYZFRIJKSTPN"
number = st.floats(min_value=-500, max_value=500, allow_nan=False, allow_infinity=False)
word = st.tuples(st.sampled_from(LETTERS), number).map(lambda w: f"{w[0]}{w[1]:.4f}")
noise = st.text(alphabet="GXYZ()#;.-+ 0123456789abcxyz\t", max_size=12)
line = st.lists(st.one_of(word, noise), max_size=8).map(" ".join)
VOCAB = Vocab.build(["G0 X0 Y0 Z0", "G1 X-5 Y10 Z-1 F40", "G2 X100 Y-100 R5 I1 J-1 K0", "M30 S12000 T2 P1"], 2)


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(line, st.text(max_size=40)))
def test_tokenizer_never_crashes(text):
    ids = VOCAB.encode(text)
    assert ids[0] == 1 and ids[-1] == 2 and all(0 <= i < len(VOCAB) for i in ids)
    VOCAB.decode(ids[1:])


@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.tuples(st.sampled_from("XYZRF"), number), min_size=1, max_size=6))
def test_representable_lines_round_trip_within_a_bucket(words):
    text = "G1 " + " ".join(f"{k}{v:.4f}" for k, v in words)
    vocab = Vocab.build([text], digits=2)
    ids = vocab.encode(text)
    assert UNK not in ids
    decoded = parse_line(vocab.decode(ids[1:]))[0]
    assert [k for k, _ in decoded] == ["G", *(k for k, _ in words)]
    for (k, got), (_, want) in zip(decoded[1:], words):
        lo, hi = vocab.ranges[k]
        assert abs(got - want) <= (hi - lo) / 100 / 2 + 1e-3


RAW = gzip.decompress((SAMPLE / "pocket_016_aligned.csv.gz").read_bytes())[:20000]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.tuples(st.integers(0, len(RAW) - 1), st.integers(0, 200), st.binary(max_size=8)),
                     max_size=4),
       compress=st.booleans(), truncate=st.integers(0, len(RAW)))
def test_reader_never_crashes_on_damaged_files(tmp_path, cuts, compress, truncate):
    data = bytearray(RAW[:truncate])
    for at, length, junk in cuts:
        data[at : at + length] = junk
    path = tmp_path / ("f_001.csv.gz" if compress else "f_001.csv")
    path.write_bytes(gzip.compress(bytes(data))[: None if truncate % 3 else -5] if compress else bytes(data))
    try:
        run = read_run(path)
    except DataError as e:
        assert str(e).startswith(str(path))
    else:
        assert run.values.shape == (len(run.lines), len(run.columns))


@pytest.mark.parametrize("junk", [b"\x00\x01\x02", b"a,b\n1,2\n", b"gcode_string\n\n"])
def test_reader_odd_small_files(tmp_path, junk):
    path = tmp_path / "odd_001.csv"
    path.write_bytes(junk)
    with pytest.raises(DataError, match="odd_001.csv"):
        read_run(path)
