"""Property tests (hypothesis): the tokenizer, the CSV reader, the live reader and the checkpoint loader
never crash on odd input, and the tokenizer gives back any line it can represent, each number within one
bucket width."""

import copy
import gzip

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from gcode_exp import GcodeExpError
from gcode_exp.data.read import DataError, read_run
from gcode_exp.data.vocab import BOS, EOS, UNK, Vocab, parse_line
from gcode_exp.live import tail_rows
from gcode_exp.predict import Predictor
from gcode_exp.training.checkpoint import Checkpoint
from tests.conftest import SAMPLE, run_py

FEW = settings(max_examples=80, deadline=None)

# --- tokenizer ---------------------------------------------------------------------------------------
LETTERS = "GMXYZFRIJKSTPNOQ"
PARAMS = "XYZFRIJKSTP"  # letters that become PARAMETER + NUMERIC tokens
COMMANDS = ("G0", "G1", "G2", "G3", "G17", "G53", "G90", "M3", "M30")
# numbers the way the controller writes them: 4 decimals, sometimes a bare trailing dot (`Z0.`, `F40.`)
four_places = st.decimals(min_value=-500, max_value=500, places=4, allow_nan=False, allow_infinity=False).map(float)
spelled = st.tuples(four_places, st.sampled_from(["{:.4f}", "{:g}", "{:.0f}."])).map(lambda t: t[1].format(t[0]))
word = st.tuples(st.sampled_from(LETTERS), spelled).map("".join)
junk = st.text(alphabet="GXYZ()#;.-+ 0123456789abcxyz\t%*[]=", max_size=12)
gcode_like = st.lists(st.one_of(word, junk), max_size=8).map(" ".join)
CORPUS = ["G0 X0 Y0 Z0", "G1 X-5 Y10 Z-1 F40", "G2 X100 Y-100 R5 I1 J-1 K0", "M30 S12000 T2 P1", "G53 Z0."]


@FEW
@given(text=st.one_of(gcode_like, st.text(max_size=40)), digits=st.sampled_from([2, 4]))
def test_tokenizer_never_crashes(text, digits):
    words, dropped = parse_line(text)
    assert dropped >= 0 and all(len(k) == 1 for k, _ in words)
    vocab = Vocab.build(CORPUS, digits)
    ids = vocab.encode(text)
    assert ids[0] == BOS and ids[-1] == EOS and all(0 <= i < len(vocab) for i in ids)
    assert isinstance(vocab.decode(ids[1:]), str)
    Vocab.build([text, *CORPUS], digits)  # a training file holding this line builds too


@FEW
@given(ids=st.lists(st.integers(0, 200), max_size=20))
def test_decoding_any_id_sequence_never_crashes(ids):
    vocab = Vocab.build(CORPUS, 2)
    assert isinstance(vocab.decode([i % len(vocab) for i in ids]), str)


@FEW
@given(
    command=st.sampled_from(("", *COMMANDS)),
    words=st.lists(st.tuples(st.sampled_from(PARAMS), spelled), min_size=1, max_size=6, unique_by=lambda w: w[0]),
    others=st.lists(st.tuples(st.sampled_from(PARAMS), four_places), max_size=10),
    digits=st.sampled_from([2, 4]),
)
def test_representable_lines_round_trip_within_a_bucket(command, words, others, digits):
    """A line built from training-file tokens (its letters known, its numbers inside the training range)
    decodes to the same words, each number within one bucket width of the original."""
    line = " ".join([command, *(k + v for k, v in words)]).strip()
    vocab = Vocab.build([line, *(f"{k}{v:.4f}" for k, v in others)], digits)
    ids = vocab.encode(line)
    assert UNK not in ids and parse_line(line)[1] == 0
    want, got = parse_line(line)[0], parse_line(vocab.decode(ids[1:]))[0]
    assert [k for k, _ in got] == [k for k, _ in want], vocab.decode(ids[1:])
    for (letter, value), (_, original) in zip(got, want):
        if letter in "GM":
            assert value == original
        else:
            lo, hi = vocab.ranges[letter]
            assert abs(value - original) <= (hi - lo) / vocab.n_buckets + 1e-9, (letter, value, original)
    assert vocab.encode(vocab.decode(ids[1:])) == ids  # decoding lands back in the same buckets


# --- reader ------------------------------------------------------------------------------------------
RAW = gzip.decompress((SAMPLE / "pocket_016_aligned.csv.gz").read_bytes())
HEAD = b"\n".join(RAW.split(b"\n")[:60]) + b"\n"  # header + 59 rows: fast to parse, still real
PIECES = [b",", b"\n", b'"', b"\r", b"\t", b"nan", b"inf", b"-inf", b"1e999", b"abc", b"#5", b"(", b";",
          b"\xff", b"\xc3", b"\x00", b"\xef\xbb\xbf"]
edit = st.tuples(st.sampled_from(["replace", "insert", "delete"]), st.integers(0, len(HEAD)), st.integers(0, 400),
                 st.one_of(st.sampled_from(PIECES), st.binary(max_size=6)))


def damaged(edits: list) -> bytes:
    """HEAD with `edits` (replace, insert or delete at a place) applied in turn."""
    data = bytearray(HEAD)
    for kind, at, n, piece in edits:
        if kind == "replace":
            data[at : at + len(piece)] = piece
        elif kind == "insert":
            data[at:at] = piece
        else:
            del data[at : at + n]
    return bytes(data)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(edit, max_size=5), compress=st.booleans(), keep=st.integers(1, 40))
def test_reader_reads_or_raises_data_error_on_damaged_files(tmp_path, edits, compress, keep):
    data = damaged(edits)
    if compress:
        data = gzip.compress(data)
        data = data[: len(data) * keep // 30] if keep < 30 else data  # a third of the time: cut short
    path = tmp_path / ("d_001_aligned.csv.gz" if compress else "d_001_aligned.csv")
    path.write_bytes(data)
    try:
        run = read_run(path)
    except DataError as e:  # the project's own error: one line, naming the file
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
    else:
        assert run.values.shape == (len(run.lines), len(run.columns)) and len(run.lines) >= 1
        assert 0 <= run.nonfinite_cells <= 0.05 * run.values.size


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(edit, max_size=5), bom=st.booleans())
def test_live_reader_reads_or_raises_data_error_on_damaged_files(tmp_path, edits, bom):
    """The reader `task=predict predict.follow=true` tails a file with: whatever the bytes, whole rows (each
    a list of fields) or the project's one-line error naming the file; the header as offline reads it."""
    path = tmp_path / "live.csv"
    path.write_bytes(b"\xef\xbb\xbf" * bom + damaged(edits))
    try:
        batches = list(tail_rows(path, poll_s=0.0, idle_s=0.0))
    except DataError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
    else:
        assert batches[-1] is None and all(isinstance(f, str) for b in batches[:-1] for row in b for f in row)
        if not edits:
            assert batches[0][0][0] == HEAD.split(b",")[0].decode()  # no mark left on the first name


# --- checkpoint loader -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict:
    """A real checkpoint's contents (the default model on the sample: seconds)."""
    ws = tmp_path_factory.mktemp("ckpt")
    r = run_py(f"hydra.run.dir={ws / 'run'}", cache=ws / "cache")
    assert r.returncode == 0, r.stderr[-2000:]
    return torch.load(ws / "run" / "checkpoints" / "best.pt", weights_only=True)


ODD = [None, 0, -1, 1.5, "x", "", True, "???", "${missing}", "${oc.env:GCODE_EXP_NOT_SET}", [], [1, "a"], {},
       {"_target_": "os.system"}, {"_target_": "builtins.eval"}, "gcode_exp.models.align.AlignModel"]
change = st.tuples(st.integers(0, 10_000), st.booleans(), st.sampled_from(ODD))


def config_keys(node: dict, prefix: tuple = ()) -> list[tuple]:
    return [k for key, v in node.items() for k in [(*prefix, key), *(config_keys(v, (*prefix, key))
                                                                      if isinstance(v, dict) else [])]]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(change, min_size=1, max_size=3))
@example(changes=[(("data", "window"), False, "???")])  # found by this test: each was a traceback
@example(changes=[(("data", "stride"), True, None)])
@example(changes=[(("model", "name"), False, {})])
def test_checkpoint_loader_builds_or_refuses_any_config_tree(tmp_path, checkpoint, changes):
    """A checkpoint whose stored config was changed anywhere (a key cut, a value of another type, `???`, a
    broken interpolation, a class to build): the loader builds the model and the predictor from it, or
    refuses in the project's one-line error naming the file; never another exception."""
    blob = copy.deepcopy(checkpoint)
    for pick, cut, value in changes:  # pick: a key's index among all keys, or the key itself
        keys = config_keys(blob["config"])
        *parents, last = pick if isinstance(pick, tuple) else keys[pick % len(keys)]
        node = blob["config"]
        for k in parents:
            node = node[k]
        if cut:
            del node[last]
        else:
            node[last] = copy.deepcopy(value)
    path = tmp_path / "changed.pt"
    torch.save(blob, path)
    try:
        loaded = Checkpoint.load(path)
        Predictor(loaded, OmegaConf.create({"device": "cpu", "amp": False, "threads": 0}), batch_size=8)
    except GcodeExpError as e:
        assert str(path) in str(e) and "\n" not in str(e), str(e)
