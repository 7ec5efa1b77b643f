"""task=serve: a monitor page for machines being recorded, and the same as a JSON API.

One `LiveStream` (gcode_exp/live.py) per machine follows its growing recording in a thread; the page
(serve_page.html) listens to `/events` (Server-Sent Events: every machine's state whenever a row arrives,
and once a second so that a stream that stopped is seen to stop). A machine's state: the program and its
probability, the current line and its place in the program's listing, the last windows' confidence, the
toolpath so far (where the predicted lines take the tool; where the recording is labelled, where its own
lines do), the jobs locked on, and its alerts (the stream stopped, no known program, the program
uncertain).

Bound to 127.0.0.1 unless serve.host says otherwise, and then only with a token (serve.token, or the
environment's GCODE_EXP_SERVE_TOKEN), which every request must carry."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import signal
import socket
import tempfile
import threading
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from gcode_exp import GcodeExpError
from gcode_exp.atomic import write_json
from gcode_exp.config import SERVE_TOKEN_ENV
from gcode_exp.data.read import DataError, run_name
from gcode_exp.live import LiveStream, Window, tail_rows
from gcode_exp.predict import Predictor, check_channels, endpoints, merge_repeats, read_recording
from gcode_exp.programs import name_program, op_line_counts
from gcode_exp.training.checkpoint import Checkpoint

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("serve_page.html")


class Machine:
    """One followed recording and what the page shows of it."""

    def __init__(self, key: str, path: Path, stream: LiveStream, history: int, alert_windows: int):
        self.key, self.path, self.stream, self.history = key, path, stream, history
        keep = max(history, alert_windows)  # what the page shows and the alerts judge: memory flat over a job
        self.windows: deque[Window] = deque(maxlen=keep)
        self.ends: dict[str, deque] = {"line": deque(maxlen=history), "true_line": deque(maxlen=history)}
        self.modal: dict[str, dict] = {"line": {}, "true_line": {}}  # where each path's lines left X, Y, Z
        self.decoded, self.labelled = 0, False  # windows so far; whether any had a true line
        self.last_row_at: float | None = None  # monotonic time the last rows arrived
        self.error: str | None = None
        self.listing_at = -1  # the current line's place in its program's listing

    def add(self, windows: list[Window], listings: dict[str, list[str]]) -> None:
        self.last_row_at = time.monotonic()
        for w in windows:
            self.windows.append(w)
            self.decoded += 1
            self.labelled = self.labelled or bool(w.true_line)
            for field, ends in self.ends.items():  # the toolpath carried on from the modal state, not recomputed
                ends.extend(endpoints([getattr(w, field)], self.modal[field]))
            listing = listings.get(w.program, [])
            self.listing_at = place(listing, w.line, self.listing_at)

    def state(self, cfg) -> dict:
        """What the page and /machines/{id}/state show; alerts judged now."""
        recent = list(self.windows)[-cfg.serve.alert_windows:]
        last = self.windows[-1] if self.windows else None
        since = None if self.last_row_at is None else time.monotonic() - self.last_row_at
        alerts = []
        if self.error:
            alerts.append(self.error)
        if since is not None and since > cfg.serve.stopped_s:
            alerts.append(f"stream stopped: no row for {since:.0f} s")
        novel = [w.novelty for w in recent if w.novelty is not None]
        if len(recent) == cfg.serve.alert_windows and novel and np.mean(novel) >= cfg.predict.novel_above:
            alerts.append(f"no known program: {np.mean(novel):.0%} of the last rows are off every training path")
        if len(recent) == cfg.serve.alert_windows and np.mean([w.program_p for w in recent]) < cfg.serve.low_p:
            alerts.append(f"recognition uncertain: program p {np.mean([w.program_p for w in recent]):.2f} over "
                          f"the last {len(recent)} windows")
        shown = list(self.windows)[-self.history:]
        return {
            "id": self.key, "recording": self.path.name, "rows": self.stream.rows, "windows": self.decoded,
            "seconds_since_row": None if since is None else round(since, 2),
            "time": last.time if last else None,
            "program": last.program if last else "", "program_p": round(last.program_p, 4) if last else 0.0,
            "locked": self.stream.program, "jobs": self.stream.jobs,
            "line": last.line if last else "", "p": round(last.p, 4) if last else 0.0,
            "true_line": last.true_line if last else "", "listing_at": self.listing_at,
            "confidence": [{"row": w.start, "p": round(w.p, 4)} for w in shown],
            "path": _points(self.ends["line"]),
            "true_path": _points(self.ends["true_line"]) if self.labelled else None,
            "alerts": alerts,
        }


def place(listing: list[str], line: str, previous: int) -> int:
    """Where `line` sits in a program's listing: its first occurrence from the previous line on (a program
    runs forward), else anywhere; -1 where the listing lacks it."""
    if line not in listing:
        return -1
    start = max(previous, 0)
    return listing.index(line, start) if line in listing[start:] else listing.index(line)


def _points(xyz: deque) -> list[list[float | None]]:
    """X, Y, Z per window ([3] arrays); None for an axis no line has named yet."""
    return [[None if np.isnan(v) else round(float(v), 4) for v in p] for p in xyz]


class Monitor:
    """The machines, their follower threads, and a version that changes whenever any of them does."""

    def __init__(self, cfg, pred: Predictor, counts: dict[str, Counter] | None, paths: list[Path]):
        self.cfg, self.pred, self.counts = cfg, pred, counts
        self.listings = {op: list(c) for op, c in (counts or {}).items()}  # lines in the order first executed
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.changed = threading.Condition(self.lock)
        self.version = 0
        keys = [run_name(p)[0] or f"machine{i}" for i, p in enumerate(paths)]
        keys = [k if keys.count(k) == 1 else f"{k}-{i}" for i, k in enumerate(keys)]
        self.machines = {k: Machine(k, p, LiveStream(p, pred, counts, cfg.predict.segment_rows, cfg.predict.lock_p),
                                    cfg.serve.history, cfg.serve.alert_windows) for k, p in zip(keys, paths)}

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._follow, args=(m,), name=f"follow-{m.key}", daemon=True)
                        for m in self.machines.values()]
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        """End the followers and wait for them: a thread left inside torch when the process exits aborts it."""
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=30)

    def _follow(self, m: Machine) -> None:
        try:
            for rows in tail_rows(m.path, self.cfg.predict.poll_s, math.inf, self.stopping):
                if rows is None:
                    break
                windows = m.stream.add(rows)
                with self.lock:
                    m.add(windows, self.listings)
                    self.version += 1
                    self.changed.notify_all()
        except GcodeExpError as e:  # shown on the page as the machine's alert; the others go on
            log.error("%s", e)
            with self.lock:
                m.error = str(e)
                self.version += 1

    def states(self) -> list[dict]:
        with self.lock:
            return [m.state(self.cfg) for m in self.machines.values()]

    def predict_file(self, body: bytes) -> dict:
        """A whole recording posted to /predict: its lines and program, as task=predict names them."""
        suffix = ".csv.gz" if body[:2] == b"\x1f\x8b" else ".csv"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"posted{suffix}"
            path.write_bytes(body)
            try:
                rec = read_recording(path, self.cfg.data.max_nonfinite)
                check_channels(path, rec.run.columns, self.pred.feats)
                if len(rec.times) < self.pred.window:
                    raise DataError(f"{path}: {len(rec.times)} rows, fewer than one window "
                                    f"(data.window={self.pred.window})")
            except GcodeExpError as e:  # named as what the user sent, not as the temporary file
                raise DataError(str(e).replace(str(path), "the posted recording")) from None
            guesses, votes = self.pred.read(rec.run)
        ranked = name_program([g.line for g in guesses], self.counts, self.pred.window / self.pred.stride) \
            if self.counts else [("", 0.0)]
        return {"rows": len(votes), "program": ranked[0][0], "p": round(ranked[0][1], 4),
                "lines": [{"row": row, "line": line} for row, line in merge_repeats([v.line for v in votes])]}


def build_app(monitor: Monitor, token: str | None):
    """The FastAPI app: the page, the event stream and the JSON API (its OpenAPI page at /docs)."""
    def allowed(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ") or request.query_params.get("token")
        if not given or not hmac.compare_digest(given, token):
            raise HTTPException(status_code=401, detail="a token is needed: ?token=... or Authorization: Bearer ...")

    app = FastAPI(title="gcode-exp monitor", dependencies=[Depends(allowed)])

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE.read_text()

    @app.get("/programs")
    def programs() -> dict[str, list[str]]:
        """Each known program's lines, in the order its training recordings first executed them."""
        return monitor.listings

    @app.get("/machines")
    def machines() -> list[dict]:
        return [{"id": m.key, "recording": str(m.path)} for m in monitor.machines.values()]

    @app.get("/machines/{key}/state")
    def state(key: str) -> dict:
        if key not in monitor.machines:
            raise HTTPException(status_code=404, detail=f"no machine {key!r} (GET /machines lists them)")
        return next(s for s in monitor.states() if s["id"] == key)

    @app.post("/predict")
    async def predict(request: Request) -> dict:
        """A whole recording (CSV or gzipped CSV as the request body): its lines and program."""
        body = await request.body()
        if len(body) > monitor.cfg.serve.max_upload_mb * 2**20:
            raise HTTPException(status_code=413, detail=f"over serve.max_upload_mb={monitor.cfg.serve.max_upload_mb}")
        try:
            return await asyncio.to_thread(monitor.predict_file, body)
        except GcodeExpError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None

    @app.get("/events", include_in_schema=False)
    async def events(request: Request) -> StreamingResponse:
        async def stream():
            seen, sent = -1, 0.0
            while not await request.is_disconnected():
                if monitor.version != seen or time.monotonic() - sent > 1.0:
                    seen, sent = monitor.version, time.monotonic()
                    yield f"data: {json.dumps(monitor.states())}\n\n"
                await asyncio.sleep(0.1)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def serve_job(cfg, run_dir) -> dict:
    """Follow serve.machines (or data.path) and serve the page until Ctrl-C or SIGTERM."""
    paths = [Path(p) for p in (cfg.serve.machines or [cfg.data.path])]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such file (serve.machines)")
    token = cfg.serve.token or os.environ.get(SERVE_TOKEN_ENV) or None
    ckpt = Checkpoint.load(cfg.ckpt_path)
    pred = Predictor(ckpt, cfg.hardware, cfg.predict.batch_size)
    monitor = Monitor(cfg, pred, op_line_counts(ckpt, pred.vocab), paths)
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.serve.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.serve.host, cfg.serve.port))
        sock.listen(128)  # connections wait from now on, so the printed address answers as soon as it is read
    except OSError as e:
        raise GcodeExpError(f"serve.port={cfg.serve.port}: cannot listen on {cfg.serve.host} ({e.strerror})") from None
    port = sock.getsockname()[1]
    monitor.start()
    server = uvicorn.Server(uvicorn.Config(build_app(monitor, token), log_level="warning", lifespan="off"))
    print(f"serve: {len(paths)} machine(s) on http://{cfg.serve.host}:{port}/ (Ctrl-C stops)", flush=True)
    started, stopped_by = time.monotonic(), []
    # Ctrl-C and SIGTERM end a server normally: uvicorn shuts down on them, then hands them on to these
    quiet = {sig: signal.signal(sig, lambda n, _: stopped_by.append(n)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in quiet.items():
            signal.signal(sig, handler)
        monitor.stop()
    states = monitor.states()
    metrics = {"ckpt_path": str(cfg.ckpt_path), "serve/seconds": round(time.monotonic() - started, 1),
               "serve/machines": [{k: s[k] for k in ("id", "rows", "windows", "locked", "program", "program_p")}
                                  for s in states]}
    print(f"serve: stopped after {metrics['serve/seconds']:.0f} s; " + "; ".join(
        f"{s['id']}: {s['rows']} rows, program {s['locked']} (locked)" if s["locked"] else
        f"{s['id']}: {s['rows']} rows, last named {s['program']} (p {s['program_p']:.2f}, not locked)"
        if s["program"] else f"{s['id']}: {s['rows']} rows, no program named" for s in states), flush=True)
    write_json(Path(run_dir) / "metrics.json", metrics)
    return metrics
