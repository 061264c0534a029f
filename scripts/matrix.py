"""Runs the supported-versions matrix (``noxfile.py``) for ``./dev matrix``: two cells at a time.

The wheel is built once; each cell is then its own ``nox -s CELL`` run, in one of
``--lanes`` lanes (longest cell first), its output kept and printed whole when it
ends, so that two cells never interleave in the log. Most of a cell's time is
spent waiting on servers, retries and deadlines, not computing: two cells side
by side on two cores take less time than one after the other (see README,
"Supported versions").

Then one line per cell. A cell that nox skipped (on this matrix: a supported
Python the machine lacks) is printed as NOT RUN, in capitals and framed: a
supported version that was not checked must be seen, never passed over.

    python scripts/matrix.py [--lanes N]     # every cell
    python scripts/matrix.py NOX ARGS        # one nox run with these arguments (e.g. -s 'matrix(py3.12-beam-newest)')
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_NOX = [sys.executable, "-m", "nox", "-f", str(ROOT / "noxfile.py")]
# Longest first, so that the lanes end together (measured: the newest Beam on 3.11 runs the
# streaming job's test beside the sink's; the floor and 2.77.0 cells run the files that use Beam).
_LONGEST_FIRST = ("py3.11-beam-newest", "py3.12-beam-newest", "py3.13-beam-newest")


def _build_wheel() -> Path:
    out = ROOT / ".nox" / "wheel"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([str(Path(sys.executable).parent / "uv"), "build", "--wheel", "--quiet", "--out-dir", str(out),
                    str(ROOT)], check=True)
    (wheel,) = out.glob("beam_tinybird-*.whl")
    return wheel


def _cells() -> list[str]:
    listed = subprocess.run([*_NOX, "-l", "--json"], check=True, capture_output=True, text=True).stdout
    cells = [entry["session"] for entry in json.loads(listed)]
    return sorted(cells, key=lambda c: (not any(key in c for key in _LONGEST_FIRST), cells.index(c)))


def _run_cell(cell: str, work: Path, env: dict[str, str], print_lock: threading.Lock) -> Path:
    report = work / f"{cell}.json"
    log = work / f"{cell}.log"
    started = time.monotonic()
    with log.open("w") as out:
        subprocess.run([*_NOX, "-s", cell, "--report", str(report)], stdout=out, stderr=subprocess.STDOUT,
                       env=env, check=False)
    with print_lock:
        print(f"==== {cell}: {time.monotonic() - started:.0f} s " + "=" * 40, flush=True)
        sys.stdout.write(log.read_text(errors="replace"))
        sys.stdout.flush()
    return report


def _summary(reports: list[Path]) -> int:
    """Prints one line per cell; returns 1 when a cell failed or left no report."""
    not_run, failed = [], False
    print("matrix: cell                          result")
    for report in reports:
        if not report.exists():
            print(f"matrix: {report.stem:<30} FAILED (nox left no report)")
            failed = True
            continue
        for session in json.loads(report.read_text(encoding="utf-8"))["sessions"]:
            # A parametrized session's name is shared by its cells; its signature names the cell.
            name, result = (session.get("signatures") or [session["name"]])[-1], session["result"]
            label = {"success": "passed", "failed": "FAILED", "skipped": "NOT RUN"}.get(result, result)
            print(f"matrix: {name:<30} {label}")
            failed = failed or result == "failed"
            if result == "skipped":
                not_run.append(name)
    if not_run:
        bar = "!" * 78
        print(f"{bar}\nmatrix: NOT RUN (interpreter missing on this machine): {', '.join(not_run)}\n"
              f"matrix: these supported versions were NOT checked by this run\n{bar}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./dev matrix", description=__doc__.split("\n")[0])
    parser.add_argument("--lanes", type=int, default=2, help="cells run at once (default 2)")
    args, nox_args = parser.parse_known_args(argv)
    if args.lanes < 1:
        parser.error(f"--lanes must be at least 1, got {args.lanes}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="matrix-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "MATRIX_WHEEL": str(_build_wheel())}
        if nox_args:
            report = work / "nox.json"
            status = subprocess.run([*_NOX, *nox_args, "--report", str(report)], env=env, check=False).returncode
            summary = _summary([report]) if report.exists() else 0  # no session run (nox -l): nothing to sum up
        else:
            lock = threading.Lock()
            with concurrent.futures.ThreadPoolExecutor(max_workers=args.lanes) as lanes:
                reports = list(lanes.map(lambda cell: _run_cell(cell, work, env, lock), _cells()))
            status = 0
            summary = _summary(reports)
    lanes = "" if nox_args else f", {args.lanes} cell(s) at a time"
    print(f"matrix: {time.monotonic() - started:.0f} s{lanes}, exit status {status or summary}")
    return status or summary


if __name__ == "__main__":
    sys.exit(main())
