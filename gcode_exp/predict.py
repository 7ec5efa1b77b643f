"""task=predict: turn recordings into the G-code they executed, and name the program; offline or live.

A trained model names the line of a *window*; each row takes the line the windows covering it vote for
(gcode_exp/row_votes.py). Runs of equal rows are the predicted program (.gcode); against a labelled
recording, the rows are scored line by line, by the tool's moves and end points, and as a sequence.

Program naming (gcode_exp/programs.py) is multinomial naive Bayes over the windows' predicted lines against
each training operation's target lines, for the whole recording (program.csv) and for the rows around each
row (its `program`; segments.csv: where that changes, a recording that holds several jobs).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gcode_exp.atomic import write_csv, write_json, write_text
from gcode_exp.data import perturb
from gcode_exp.data.dataset import same_recording_twice
from gcode_exp.data.read import RUN_NAME, DataError, RecordedRun, list_runs, read_run
from gcode_exp.data.vocab import parse_line
from gcode_exp.data.windows import Features, run_inputs
from gcode_exp.models import Windows
from gcode_exp.programs import name_program, op_line_counts, row_programs, segments
from gcode_exp.row_votes import Guess, RowVote, row_head_answers, vote, window_starts
from gcode_exp.training.checkpoint import Checkpoint
from gcode_exp.training.device import autocast, pick_device

log = logging.getLogger(__name__)
AXES = "XYZ"
MOVES = {0.0: "rapid", 1.0: "line", 2.0: "arc", 3.0: "arc"}  # what a move is, by its motion mode G0 .. G3
ROW_FIELDS = ("time", "row", "line", "p", "runner_up", "runner_up_p", "program", "true_line", "correct")


# --- reading -------------------------------------------------------------------------------------------
@dataclass
class Recording:
    run: RecordedRun  # values and lines ("" where unlabelled, or everywhere when the file has no gcode_string)
    times: list[str]  # t_console per row, or the row index where the file has none
    rows: np.ndarray | None = None  # perturb=...: each row's row in the recording it was read from (None: its own)

    @property
    def labelled(self) -> bool:
        return any(self.run.lines)


def read_recording(path: Path, max_nonfinite: float) -> Recording:
    """read_run's checks and messages, but a recording without labels is fine here."""
    run = read_run(path, max_nonfinite, labelled=False)
    return Recording(run=run, times=run.times)


def perturbed(recordings: list[Recording], cfg, window: int, skipped: list[dict]) -> list[Recording]:
    """perturb=...: the recordings changed as in shop use (gcode_exp/data/perturb.py), each row keeping the
    number of the row it was read from (after concat: in its part); unchanged where perturb is neutral."""
    if perturb.is_neutral(cfg.get("perturb")):
        return recordings
    changed = perturb.perturb_with_rows([r.run for r in recordings], cfg.get("perturb"), window=window,
                                        on_error=cfg.data.on_error, skipped=skipped)
    return [Recording(run=run, times=run.times, rows=rows) for run, rows in changed]


def check_channels(path: Path | str, columns: list[str], feats: Features) -> None:
    """The checkpoint's motor/controller channels must all be there (a missing IMU board reads as absent)."""
    missing = [c for c in feats.channels if "." not in c and c not in columns]
    if missing:
        raise DataError(f"{path}: lacks channels the checkpoint was trained on: {', '.join(missing[:5])}")



# --- one window -> one line, a recording -> its rows ----------------------------------------------------
class Predictor:
    """A checkpoint's model, vocabulary, features and window geometry: windows in, lines out."""

    def __init__(self, ckpt: Checkpoint, hardware, batch_size: int):
        self.device = pick_device(hardware)
        self.model, self.vocab = ckpt.model(self.device)
        self.feats = ckpt.features
        data = ckpt.config["data"]
        self.window, self.stride, self.max_len = data["window"], data["stride"], data["max_len"]
        self.amp, self.batch_size = bool(hardware.amp), batch_size

    @torch.no_grad()
    def guess(self, x: np.ndarray, starts: list[int]) -> list[Guess]:
        """The model's answers for the windows x[s : s + window] (x: normalised inputs of one recording)."""
        if not starts:
            return []
        windows = Windows.of_rows(torch.from_numpy(x).to(self.device), torch.tensor(starts), self.window)
        with autocast(self.device, self.amp):
            answer = self.model.predict(windows, self.batch_size)
        rows = answer.rows.float().cpu().numpy() if answer.rows is not None else [None] * len(starts)
        novelty = answer.novelty.tolist() if answer.novelty is not None else [None] * len(starts)
        return [Guess(s, self.vocab.decode(ids), float(p), r, n)
                for s, ids, p, r, n in zip(starts, answer.tokens.tolist(), answer.p.tolist(), rows, novelty)]

    def read(self, run: RecordedRun) -> tuple[list[Guess], list[RowVote]]:
        """A whole recording's windows and each row's answer."""
        guesses = self.guess(run_inputs(run, self.feats), window_starts(len(run.lines), self.window, self.stride))
        return guesses, row_head_answers(vote(len(run.lines), guesses, self.window), guesses, self.lines, self.window)

    @property
    def lines(self) -> list[str]:
        """The row answers as text (`Model.lines`: a row head's classes, the training windows' target lines,
        or a reference's lines, every line a training row executes)."""
        return [self.vocab.decode(t[1:]) for t in self.model.lines.tolist()]


# --- the predicted program ------------------------------------------------------------------------------
def merge_repeats(lines: list[str]) -> list[tuple[int, str]]:
    """(first row, line) of each run of equal consecutive lines."""
    return [(i, t) for i, t in enumerate(lines) if i == 0 or t != lines[i - 1]]


def reconstruct(votes: list[RowVote], times: list[str], min_p: float, title: str) -> str:
    """The predicted program: one line per run of equal rows, its start time and mean probability as a
    comment, `LOW` where that mean is below min_p."""
    out = [f"; {title}", f"; one line per run of equal predicted rows; LOW: mean p < {min_p}"]
    runs = merge_repeats([v.line for v in votes])
    for j, (start, line) in enumerate(runs):
        end = runs[j + 1][0] if j + 1 < len(runs) else len(votes)
        p = float(np.mean([v.p for v in votes[start:end]]))
        out.append(f"{line or '(unknown)'} ; t={times[start]} p={p:.2f}{' LOW' if p < min_p else ''}")
    return "\n".join(out) + "\n"


# --- scoring ---------------------------------------------------------------------------------------------
def endpoints(lines: list[str], pos: dict[str, float] | None = None) -> np.ndarray:
    """[rows, 3] where each row's line takes the tool (X, Y, Z). G-code is modal: an axis a line does not name
    stays where the lines before left it (NaN until one names it); the programs are absolute (G90). `pos`:
    where earlier lines left each axis, updated in place, so that a stream's path goes on window by window."""
    pos = {} if pos is None else pos
    for axis in AXES:
        pos.setdefault(axis, np.nan)
    out, last = np.full((len(lines), len(AXES)), np.nan), None
    for i, line in enumerate(lines):
        if line != last:
            for letter, value in parse_line(line)[0]:
                if letter in AXES:
                    pos[letter] = value
            last = line
        out[i] = [pos[a] for a in AXES]
    return out


def axis_moves(lines: list[str]) -> list[tuple[int, int, int]]:
    """Per row: the direction (-1, 0, +1) of X, Y and Z from where the previous different line left the
    tool to where this row's line takes it (0 where either is not known)."""
    ends, out, move = endpoints(lines), [], (0, 0, 0)
    for i, line in enumerate(lines):
        if i == 0 or line != lines[i - 1]:
            step = ends[i] - (ends[i - 1] if i else np.nan)
            move = tuple(int(v) for v in np.nan_to_num(np.sign(step)))
        out.append(move)
    return out


def move_types(lines: list[str]) -> list[str]:
    """Per row: the kind of move its line makes, rapid, line or arc ("" for a line that moves nothing: M30).
    Read from the line alone, not from the lines before it (at 4 rows a second about half a program's lines
    are never seen, so a mode inherited from the last line seen is often not the program's): the motion word
    where there is one (G0 rapid, G1 line, G2/G3 arc), else arc parameters (R, I, J, K) make an arc and an
    X/Y/Z word a straight line. On the shared recordings this agrees with the controller's own motion mode
    (`momo`) on 99.4 % of the rows where both name one (docs/RESULTS.md)."""
    kinds: dict[str, str] = {}
    for line in set(lines):
        words = parse_line(line)[0]
        named = [MOVES[v] for k, v in words if k == "G" and v in MOVES]
        kinds[line] = named[-1] if named else "arc" if any(k in "RIJK" for k, _ in words) else \
            "line" if any(k in AXES for k, _ in words) else ""
    return [kinds[line] for line in lines]


def edit_similarity(a: list[str], b: list[str]) -> float:
    """1 - Levenshtein distance / the longer length (1: the same sequence).

    One row of the distance table at a time in numpy: cur[j] = min(t[j], cur[j - 1] + 1) with t the
    deletion and substitution costs, which is a running minimum of t[j] - j, plus j. So a long labelled
    recording (thousands of lines) costs len(a) vector steps, not len(a) x len(b) Python steps."""
    if not a or not b:
        return 1.0 if not a and not b else 0.0
    ids: dict[str, int] = {}
    x = np.array([ids.setdefault(s, len(ids)) for s in a])
    y = np.array([ids.setdefault(s, len(ids)) for s in b])
    j = np.arange(len(b) + 1)
    prev = j.copy()
    for i, token in enumerate(x, 1):
        t = np.empty(len(b) + 1, dtype=np.int64)
        t[0] = i
        t[1:] = np.minimum(prev[1:] + 1, prev[:-1] + (y != token))
        prev = np.minimum.accumulate(t - j) + j
    return 1.0 - int(prev[-1]) / max(len(a), len(b))


def score_rows(pred: list[str], true: list[str]) -> dict[str, float]:
    """Counts on the labelled rows: lines right, move directions right (X, Y, Z each -, 0 or +), moving axes
    right (which of X, Y, Z move), move types right (of the rows whose true mode is known); the sequence
    similarity and each row's end-point error (how far its predicted line's end is from its true line's, in
    the data's units). `true` already at the vocabulary's resolution ("" where unlabelled)."""
    keep = [i for i, t in enumerate(true) if t]
    p, t = [pred[i] for i in keep], [true[i] for i in keep]
    miss = np.linalg.norm(endpoints(p) - endpoints(t), axis=1)  # NaN where either end is not known yet
    moves = list(zip(axis_moves(p), axis_moves(t)))
    kinds = [(a, b) for a, b in zip(move_types(p), move_types(t)) if b]
    return {"rows": len(keep), "right": sum(a == b for a, b in zip(p, t)),
            "axis_right": sum(a == b for a, b in moves),
            "moving_right": sum(np.array_equal(np.abs(a), np.abs(b)) for a, b in moves),
            "move_rows": len(kinds), "move_right": sum(a == b for a, b in kinds),
            "similarity": edit_similarity([x for _, x in merge_repeats(p)], [x for _, x in merge_repeats(t)]),
            "end_errors": miss[np.isfinite(miss)]}


# --- the job ---------------------------------------------------------------------------------------------
def predict_job(cfg, run_dir: Path) -> dict:
    """Offline: every recording of data.dir; live (predict.follow=true): data.path as it is written."""
    ckpt = Checkpoint.load(cfg.ckpt_path)
    pred = Predictor(ckpt, cfg.hardware, cfg.predict.batch_size)
    fallback = None  # the checkpoint that answers a recording of no known program (offline only)
    if cfg.predict.fallback and not cfg.predict.follow:
        fallback_ckpt = Checkpoint.load(cfg.predict.fallback, source=f"predict.fallback={cfg.predict.fallback}")
        fallback = Predictor(fallback_ckpt, cfg.hardware, cfg.predict.batch_size)
    out = run_dir / "predictions"  # made once there is something to write: a failed run leaves none
    if cfg.predict.follow:
        from gcode_exp.live import follow

        return follow(cfg, run_dir, pred, op_line_counts(ckpt, pred.vocab))
    recordings, skipped = [], []
    paths = list_runs(cfg.data.dir, cfg.data.pattern)
    twice = same_recording_twice(paths)
    for path in paths:
        try:
            if path in twice:
                raise DataError(twice[path])
            rec = read_recording(path, cfg.data.max_nonfinite)
            for p in (pred, fallback) if fallback else (pred,):
                check_channels(path, rec.run.columns, p.feats)
                if len(rec.times) < p.window:
                    raise DataError(f"{path}: {len(rec.times)} rows, fewer than one window (data.window={p.window})")
            recordings.append(rec)
        except DataError as e:
            if cfg.data.on_error != "skip":
                raise
            log.warning("skipping %s", e)
            skipped.append({"file": path.name, "error": str(e)})
    recordings = perturbed(recordings, cfg, pred.window, skipped)
    if not recordings:
        raise DataError(f"{cfg.data.dir}: no usable recordings")
    ckpt.seen_in_training([rec.run.name for rec in recordings])
    counts = op_line_counts(ckpt, pred.vocab)
    majority_line = pred.vocab.decode(ckpt.majority_line[1:].tolist())
    majority_op = max(sorted(counts), key=lambda op: sum(counts[op].values())) if counts else ""
    totals: Counter = Counter()
    end_errors: dict[str, list[np.ndarray]] = {"predict": [], "majority": []}
    programs, cuts = [], []
    out.mkdir(exist_ok=True)
    for rec in recordings:
        run = rec.run
        guesses, votes = pred.read(run)
        known = [g.novelty for g in guesses if g.novelty is not None]
        novelty = float(np.mean(known)) if known else None
        new = novelty is not None and novelty >= cfg.predict.novel_above
        answering = fallback if new and fallback else pred
        if answering is fallback:
            log.info("%s: novelty %.2f >= predict.novel_above: no known program; answered by %s", run.name, novelty,
                     cfg.predict.fallback)
            guesses, votes = fallback.read(run)
        true = [answering.vocab.decode(answering.vocab.encode(t)[1:]) if t else "" for t in run.lines]
        row_prog, row_p = [""] * len(votes), np.zeros(len(votes))
        if counts and not new:
            row_prog, row_p = row_programs([v.line for v in votes], counts, cfg.predict.segment_rows,
                                           pred.stride / pred.window)
        write_rows(out / f"{run.name}.csv", votes, rec, true, row_prog)
        source = rec.rows if rec.rows is not None else np.arange(len(votes))
        found = segments(row_prog, row_p, cfg.predict.min_segment) if counts and not new else []
        cuts += [{"recording": run.name, "segment": k, "first_row": int(source[s["first_row"]]),
                  "last_row": int(source[s["last_row"]]), "rows": s["last_row"] - s["first_row"] + 1,
                  "program": s["program"], "p": f"{s['p']:.4f}"} for k, s in enumerate(found)]
        ckpt = cfg.predict.fallback if answering is fallback else cfg.ckpt_path
        title = f"{run.name}: predicted by gcode-exp from {ckpt} ({len(votes)} rows, {len(guesses)} windows)"
        write_text(out / f"{run.name}.gcode", reconstruct(votes, rec.times, cfg.predict.min_p, title))
        ranked = name_program([g.line for g in guesses], counts, pred.window / pred.stride) \
            if counts and not new else [("", 0.0)]
        true_op = run.op if RUN_NAME.match(run.name) else ""
        programs.append({"recording": run.name, "program": ranked[0][0], "p": f"{ranked[0][1]:.4f}",
                         "runner_up": ranked[1][0] if len(ranked) > 1 else "",
                         "runner_up_p": f"{ranked[1][1]:.4f}" if len(ranked) > 1 else "", "true_program": true_op,
                         "novelty": "" if novelty is None else f"{novelty:.4f}",
                         "answered_by": "fallback" if answering is fallback else "checkpoint"})
        if true_op and "+" not in true_op:  # perturb.concat's `a+b` holds two programs: not one to name
            totals.update(programs_known=1, program_right=ranked[0][0] == true_op,
                          majority_program=majority_op == true_op)
        if rec.labelled:
            s, m = score_rows([v.line for v in votes], true), score_rows([majority_line] * len(true), true)
            for key, scored in (("", s), ("m_", m)):
                totals.update({f"{key}{k}": scored[k] for k in ("right", "axis_right", "moving_right", "move_rows",
                                                               "move_right", "similarity")})
            totals.update(files=1, rows=s["rows"])
            end_errors["predict"].append(s["end_errors"])
            end_errors["majority"].append(m["end_errors"])
        named = "no known program" if new else f"program {ranked[0][0] or '?'} (p={ranked[0][1]:.2f})"
        print(f"{run.name}: {len(votes)} rows -> {len(merge_repeats([v.line for v in votes]))} lines; {named}"
              f"{f' (novelty {novelty:.2f})' if novelty is not None else ''}{f', true {true_op}' if true_op else ''}")
    write_csv(run_dir / "program.csv", programs)
    write_csv(run_dir / "segments.csv", cuts, ["recording", "segment", "first_row", "last_row", "rows", "program", "p"])
    write_json(run_dir / "data_summary.json", {"data_dir": str(cfg.data.dir), "skipped_files": skipped,
                                              "predict": {"files": [r.run.name for r in recordings]},
                                              "perturb": perturb.summary(cfg.get("perturb"))})
    metrics = {"ckpt_path": str(cfg.ckpt_path), "predict/files": len(recordings),
               "perturb": perturb.describe(cfg.get("perturb"))}
    if totals["rows"]:
        for prefix, key in (("predict", ""), ("majority", "m_")):
            metrics[f"{prefix}/row_line_acc"] = totals[f"{key}right"] / totals["rows"]
            metrics[f"{prefix}/axis_acc"] = totals[f"{key}axis_right"] / totals["rows"]
            metrics[f"{prefix}/moving_axes_acc"] = totals[f"{key}moving_right"] / totals["rows"]
            if totals[f"{key}move_rows"]:
                metrics[f"{prefix}/move_type_acc"] = totals[f"{key}move_right"] / totals[f"{key}move_rows"]
            metrics[f"{prefix}/sequence_similarity"] = totals[f"{key}similarity"] / totals["files"]
            errors = np.concatenate(end_errors[prefix])
            # the share of labelled rows the end error is over: a recording that starts mid-job knows where its
            # lines end only once each axis has been named, so its error covers fewer rows
            metrics[f"{prefix}/end_error_rows"] = len(errors) / totals["rows"]
            if len(errors):  # the lines' end points, where the rows' lines name them
                metrics[f"{prefix}/end_error_mean"] = float(errors.mean())
                metrics[f"{prefix}/end_error_p95"] = float(np.percentile(errors, 95))
    if totals["programs_known"] and counts:
        metrics["predict/program_acc"] = totals["program_right"] / totals["programs_known"]
        metrics["majority/program_acc"] = totals["majority_program"] / totals["programs_known"]
    write_json(run_dir / "metrics.json", metrics)
    shown = " | ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "/" in k and k != "predict/files")
    log.info("%s", shown or "no labelled rows: nothing to score")
    return metrics


def write_rows(path: Path, votes: list[RowVote], rec: Recording, true: list[str], programs: list[str]) -> None:
    source = rec.rows if rec.rows is not None else range(len(votes))  # perturb=...: the row it was read from
    rows = [dict(zip(ROW_FIELDS, (rec.times[i], int(r), v.line, f"{v.p:.4g}", v.runner_up, f"{v.runner_up_p:.4g}",
                                  prog, rec.run.lines[i], int(v.line == t) if t else ""), strict=True))
            for i, (v, t, r, prog) in enumerate(zip(votes, true, source, programs))]
    write_csv(path, rows, list(ROW_FIELDS))
