"""Print the wall time of each stage run since a given moment (`make repro` calls this at the end)."""
from __future__ import annotations

import sys
import time

from .io import STAGE_TIMES


def main(argv: list[str]) -> None:
    since = float(argv[0]) if argv else 0.0
    if not STAGE_TIMES.exists():
        print("no stage ran")
        return
    rows = []
    for line in STAGE_TIMES.read_text(encoding="utf-8").splitlines():
        ended, stage, seconds = line.split("\t")
        if float(ended) >= since:
            rows.append((stage.strip(), float(seconds)))
    if not rows:
        print("no stage ran: everything was up to date")
        return
    width = max(len(s) for s, _ in rows)
    for stage, seconds in rows:
        print(f"  {stage:<{width}}  {seconds:7.1f} s")
    total = sum(s for _, s in rows)
    wall = f", {time.time() - since:.0f} s wall" if since else ""
    print(f"  {len(rows)} stages, {total:.0f} s in stage processes{wall}")


if __name__ == "__main__":
    main(sys.argv[1:])
