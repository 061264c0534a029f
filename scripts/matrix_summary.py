"""Prints one line per cell of a `./dev matrix` run from nox's JSON report (nox --report FILE).

A cell that nox skipped (on this matrix: a supported Python the machine lacks) is
printed as NOT RUN, in capitals and framed: a supported version that was not
checked must be seen, never passed over.
"""

from __future__ import annotations

import json
import sys


def main(report_path: str) -> int:
    with open(report_path, encoding="utf-8") as f:
        sessions = json.load(f)["sessions"]
    not_run = []
    print("matrix: cell                          result")
    for session in sessions:
        # A parametrized session's name is shared by its cells; its signature names the cell.
        name, result = (session.get("signatures") or [session["name"]])[-1], session["result"]
        label = {"success": "passed", "failed": "FAILED", "skipped": "NOT RUN"}.get(result, result)
        print(f"matrix: {name:<30} {label}")
        if result == "skipped":
            not_run.append(name)
    if not_run:
        bar = "!" * 78
        print(f"{bar}\nmatrix: NOT RUN (interpreter missing on this machine): {', '.join(not_run)}\n"
              f"matrix: these supported versions were NOT checked by this run\n{bar}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
