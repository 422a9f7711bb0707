"""Datasets (CounterFact, known_1000, zsRE, EasyEdit's CounterFact) and the known-fact filter.

    from tracekit.data import load_dataset
    records = load_dataset("counterfact", n=2000)          # ../shared/data, $TRACEKIT_DATA or a path
    known = filter_known(model, records, cache=store)       # the paper's 36-token greedy filter
"""

from tracekit.data.known import filter_known, is_known, known_flags
from tracekit.data.loaders import (load_counterfact, load_dataset, load_easyedit_counterfact, load_known,
                                   load_zsre)
from tracekit.data.locate import DATASETS, download_dataset, find_data_file
from tracekit.data.records import FactRecord

__all__ = ["DATASETS", "FactRecord", "download_dataset", "filter_known", "find_data_file", "is_known",
           "known_flags", "load_counterfact", "load_dataset", "load_easyedit_counterfact", "load_known",
           "load_zsre"]
