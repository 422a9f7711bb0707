#!/usr/bin/env python
"""How long the command line takes to answer: CPU seconds (user + sys) of `import tracekit`,
`tracekit --help` and, for scale, `import torch`, each in a fresh interpreter (best of --repeat).

    python benchmarks/import_time.py [--repeat 5] [--out benchmarks/results/import-time.json]

Goal: `tracekit --help` under 1 s of CPU (it was 10-11 s when the CLI imported every
transformers model class). CPU time, not wall time, so a busy machine does not move it much.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

COMMANDS = {
    "import tracekit": [sys.executable, "-c", "import tracekit"],
    "tracekit --help": [sys.executable, "-m", "tracekit", "--help"],
    "import torch (for scale)": [sys.executable, "-c", "import torch"],
}
GOAL_SECONDS = 1.0


def cpu_seconds(argv: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="runs per command; the best is reported")
    parser.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    results = {name: min(cpu_seconds(cmd) for _ in range(args.repeat)) for name, cmd in COMMANDS.items()}
    for name, seconds in results.items():
        print(f"{name:28s} {seconds:6.2f} s CPU")
    ok = results["tracekit --help"] < GOAL_SECONDS
    print(f"goal: tracekit --help < {GOAL_SECONDS} s CPU: {'met' if ok else 'MISSED'}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"cpu_seconds": results, "goal_seconds": GOAL_SECONDS}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
