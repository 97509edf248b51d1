"""``make chaos``: the whole system under fire; one table row per fault; exit 1 on a loss.

Starts a private PostgreSQL cluster, a private redis-server (AOF on), a recording SMTP
sink, gunicorn, two bulk workers, a high_priority worker and beat; sends a campaign per
fault (``--recipients`` split evenly: 20,000 by default) plus a transactional email every
half second through the HTTP API, and injects each fault while its campaign drains.
The run passes only if nothing was lost and every duplicate is within the bound the
fault allows (see the table's "allowed" column and the notes under it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from chaos.scenario import FAULTS, Row, run, table
from chaos.stack import Stack


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--recipients", type=int, default=20_000, help="campaign recipients, over all faults"
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiplies every fault window (60 s relay outage, 10 s Postgres stop, ...)",
    )
    parser.add_argument(
        "--faults",
        default=",".join(f.key for f in FAULTS),
        help=f"comma-separated, from {', '.join(f.key for f in FAULTS)}",
    )
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    known = {f.key for f in FAULTS}
    chosen = [k.strip() for k in args.faults.split(",") if k.strip()]
    if not chosen or set(chosen) - known:
        parser.error(f"--faults: choose from {', '.join(sorted(known))}")
    if args.recipients < len(chosen) or args.scale <= 0:
        parser.error("--recipients must be at least one per fault and --scale positive")
    args.fault_list = [f for f in FAULTS if f.key in chosen]
    return args


def log(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    log("starting Postgres, Redis, the SMTP sink, web, 2 x worker-bulk, worker-high, beat")
    with Stack() as stack:
        log(f"up in {time.monotonic() - started:.0f}s; work directory {stack.root}")
        rows: list[Row] = run(stack, args.recipients, args.scale, args.fault_list, log=log)
    elapsed = time.monotonic() - started
    print()
    print(
        f"Chaos run: {args.recipients:,} campaign recipients over {len(rows)} faults, "
        f"--scale {args.scale:g}, {elapsed:.0f} s in all"
    )
    print()
    print(table(rows))
    if args.json:
        data = {"recipients": args.recipients, "scale": args.scale, "seconds": elapsed}
        data["rows"] = [asdict(r) | {"ok": r.ok} for r in rows]
        args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
    failed = [r.fault for r in rows if not r.ok]
    print()
    print(f"FAIL: {', '.join(failed)}" if failed else "PASS: nothing lost, duplicates in bounds")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
