#!/usr/bin/env python
"""The paper's known-fact filter over CounterFact in ../shared/data, verdicts cached in a store.

    python docs/replication/counterfact/known_filter.py --store docs/replication/counterfact/store.sqlite
    python docs/replication/counterfact/known_filter.py --dataset counterfact-easyedit --n 2000 --store ...

A point is known when the model's greedy 36-token continuation of its prompt contains o_true
(Hase et al. 2023, appendix A). Verdicts go into the store's known-fact cache, where the tracing
and edit recipes find them (the same store, model and dataset), so they are computed once.
Prints the count, the share, and the counts by relation.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

from tracekit import load_model
from tracekit.data import known_flags, load_dataset
from tracekit.store import ResultStore


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="counterfact", choices=["counterfact", "counterfact-easyedit"])
    parser.add_argument("--n", type=int, default=None, help="first N records in case-id order (default: all)")
    parser.add_argument("--data", default=None, help="dataset file or folder (default: $TRACEKIT_DATA, ../shared/data)")
    parser.add_argument("--store", required=True, help="result store holding the verdicts")
    args = parser.parse_args(argv)

    records = load_dataset(args.dataset, args.data, args.n)
    model = load_model(args.model)
    start = time.perf_counter()
    with ResultStore(args.store) as store:
        flags = known_flags(model, records, cache=store)
    seconds = time.perf_counter() - start
    known = [r for r, flag in zip(records, flags) if flag]
    print(f"{len(known)} of {len(records)} {args.dataset} records known to {args.model} "
          f"({len(known) / len(records):.1%}); {seconds:.0f} s (cached verdicts are not regenerated)")
    print(f"prompts per point: {records[0].prompt_sets}")
    by_relation = collections.Counter(r.relation_id or "(none)" for r in records)
    known_by_relation = collections.Counter(r.relation_id or "(none)" for r in known)
    for relation, total in by_relation.most_common():
        print(f"  {relation}: {known_by_relation[relation]} of {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
