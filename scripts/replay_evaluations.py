"""Replay a demo run's evaluations in one process and time them: every ``copa evaluate`` command that
``DEMO/results.json`` lists for the chosen tasks, run through ``copa.cli.main`` with its output sent
under ``OUT`` (the demo's own files are left alone). This is how "Where the demo's evaluations went"
in BENCHMARKS.md (session 17) compared the evaluation code of two commits on the same models:

    PYTHONPATH=OLD_CHECKOUT/src python scripts/replay_evaluations.py runs/demo /tmp/replay
    python scripts/replay_evaluations.py runs/demo /tmp/replay
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import time
from pathlib import Path

log = logging.getLogger("replay_evaluations")


def evaluate_commands(demo: Path, tasks: list[str]) -> list[list[str]]:
    """The argument lists (without ``copa``) of the demo's ``copa evaluate TASK`` commands, in order."""
    commands = json.loads((demo / "results.json").read_text())["commands"]
    out = []
    for line in commands:
        argv = shlex.split(line)[1:]
        if argv[:1] == ["evaluate"] and argv[1] in tasks:
            out.append(argv)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo", type=Path, help="a finished `copa demo --out` directory")
    ap.add_argument("out", type=Path, help="where the replayed evaluations write")
    ap.add_argument("--tasks", nargs="+", default=["vqa", "grounding"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from copa import cli

    seconds: dict[str, list[float]] = {}
    start = time.perf_counter()
    for i, argv in enumerate(evaluate_commands(args.demo, args.tasks)):
        argv[argv.index("--out") + 1] = str(args.out / str(i))
        t = time.perf_counter()
        logging.disable(logging.INFO)  # the commands' own logs; only the timings below
        try:
            if cli.main(argv):
                raise SystemExit(f"failed: copa {shlex.join(argv)}")
        finally:
            logging.disable(logging.NOTSET)
        seconds.setdefault(argv[1], []).append(time.perf_counter() - t)
    for task, times in seconds.items():
        log.info("%s: %d evaluations, %.1f s", task, len(times), sum(times))
    log.info("all: %.1f s", time.perf_counter() - start)


if __name__ == "__main__":
    main()
