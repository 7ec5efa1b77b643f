"""How far the monitor page lags the machines: `--machines` recordings written at `--rate` rows a second
each while task=serve (pinned to `--cores` cores) follows them; each row's delay from its write to the
first /events message that counts it.

    python -m gcode_exp.bench_serve --ckpt RUN/checkpoints/best.pt --data-dir ../shared/data/cnc_sensor_gcode
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from gcode_exp.data.read import list_runs, text_rows

ROOT = Path(__file__).resolve().parents[1]


def write_rows(path: Path, rows: list[str], rate: float, until: float, written: list[float]) -> None:
    """Append one row every 1/rate s until `until` (monotonic), noting when each was flushed."""
    with open(path, "a") as f:
        for row in rows[1:]:
            start = time.monotonic()
            if start >= until:
                return
            f.write(row)
            f.flush()
            written.append(time.monotonic())
            time.sleep(max(0.0, 1 / rate - (time.monotonic() - start)))


def read_events(url: str, seen: dict[str, list[float]], stop: threading.Event) -> None:
    """Each machine's row count as /events reports it: seen[id][k] = when row k was first counted."""
    with urllib.request.urlopen(url + "events", timeout=60) as stream:
        for raw in stream:
            if stop.is_set():
                return
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            now = time.monotonic()
            for state in json.loads(line[6:]):
                counted = seen.setdefault(state["id"], [])
                counted.extend([now] * (state["rows"] - len(counted)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="the checkpoint the page predicts with")
    ap.add_argument("--data-dir", default="data/sample", help="recordings replayed, one per machine")
    ap.add_argument("--machines", type=int, default=4)
    ap.add_argument("--rate", type=float, default=4.0, help="rows a second per machine (the recordings: ~4)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--cores", type=int, default=1, help="the server is pinned to this many cores")
    args = ap.parse_args(argv)
    sources = list_runs(args.data_dir, "*.csv*")[: args.machines]
    if len(sources) < args.machines:
        sys.exit(f"error: --data-dir {args.data_dir}: {len(sources)} recordings, fewer than --machines")
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / f"mill{i}.csv" for i in range(args.machines)]
        rows = [text_rows(p) for p in sources]
        for f, r in zip(files, rows):
            f.write_text(r[0])
        cores = set(sorted(os.sched_getaffinity(0))[: args.cores])
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), "task=serve", f"ckpt_path={args.ckpt}", "serve.port=0",
             f"serve.machines=[{','.join(map(str, files))}]", f"hydra.run.dir={tmp}/run", "hardware.threads=1"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: os.sched_setaffinity(0, cores))
        first = server.stdout.readline()
        address = re.search(r"on (http://\S+/) ", first)
        if not address:
            server.kill()
            sys.exit(f"error: task=serve did not start: {server.stderr.read()[-1000:]}")
        seen: dict[str, list[float]] = {}
        stop = threading.Event()
        threading.Thread(target=read_events, args=(address.group(1), seen, stop), daemon=True).start()
        until = time.monotonic() + args.seconds
        written: list[list[float]] = [[] for _ in files]
        writers = [threading.Thread(target=write_rows, args=(f, r, args.rate, until, w))
                   for f, r, w in zip(files, rows, written)]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        time.sleep(3)  # the last rows' messages
        stop.set()
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=60)
    lags = [seen.get(f"mill{i}", [])[k] - t for i, w in enumerate(written) for k, t in enumerate(w)
            if k < len(seen.get(f"mill{i}", []))]
    total = sum(len(w) for w in written)
    result = {"machines": args.machines, "rate": args.rate, "cores": len(cores), "rows_written": total,
              "rows_shown": len(lags), "lag_p50_s": float(np.median(lags)) if lags else None,
              "lag_p95_s": float(np.percentile(lags, 95)) if lags else None,
              "lag_max_s": float(max(lags)) if lags else None}
    print(f"monitor: {args.machines} machines x {args.rate:g} rows/s on {len(cores)} core(s) for {args.seconds:g} s: "
          f"{len(lags)} of {total} rows shown; lag from write to the page's stream p50 "
          f"{result['lag_p50_s'] or float('nan'):.3f} s, p95 {result['lag_p95_s'] or float('nan'):.3f} s, "
          f"max {result['lag_max_s'] or float('nan'):.3f} s")
    return result


if __name__ == "__main__":
    main()
