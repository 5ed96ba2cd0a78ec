"""Print the wall time of each stage run since a given moment (`make repro` calls this at the end)."""
from __future__ import annotations

import argparse
import time

from .io import STAGE_TIMES


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m resnorm.times", description=__doc__.splitlines()[0])
    ap.add_argument("since", nargs="?", type=float, default=0.0,
                    help="a Unix time (`date +%%s`): only stages that ended after it (default: all)")
    since = ap.parse_args(argv).since
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
    main()
