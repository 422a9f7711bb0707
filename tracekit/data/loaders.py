"""Parsers from each dataset's JSON format to ``FactRecord``.

Every record is checked; a bad one stops the load with its index and field (a dataset
with a silently dropped point would shift every later case and every statistic).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from tracekit.data.locate import dataset_files, find_data_file
from tracekit.data.records import FactRecord, RecordReader, with_space
from tracekit.data.world_facts import world_facts
from tracekit.errors import TracekitError


def parse_counterfact(r: RecordReader) -> FactRecord:
    """ROME's CounterFact: {case_id, requested_rewrite{prompt, subject, target_true, target_new,
    relation_id}, paraphrase_prompts, neighborhood_prompts, ...}."""
    subject = r.get("requested_rewrite.subject")
    return FactRecord(
        case_id=r.get("case_id", int),
        prompt=r.template("requested_rewrite.prompt", subject),
        subject=subject,
        target_true=with_space(r.get("requested_rewrite.target_true.str")),
        target_new=with_space(r.get("requested_rewrite.target_new.str")),
        paraphrase_prompts=r.strings("paraphrase_prompts"),
        neighborhood_prompts=r.strings("neighborhood_prompts"),
        relation_id=r.get("requested_rewrite.relation_id", required=False) or "",
        source="counterfact",
    )


def parse_known(r: RecordReader) -> FactRecord:
    """ROME's known_1000: {known_id, subject, attribute, template, prediction, prompt, relation_id}."""
    subject = r.get("subject")
    has_template = isinstance(r.raw.get("template"), str) and "{}" in r.raw["template"]
    return FactRecord(
        case_id=r.get("known_id", int),
        prompt=r.template("template", subject) if has_template else r.template("prompt", subject),
        subject=subject,
        target_true=with_space(r.get("attribute")),
        target_new=None,
        relation_id=r.get("relation_id", required=False) or "",
        source="known_1000",
    )


def parse_zsre(r: RecordReader) -> FactRecord:
    """zsRE (MEND's evaluation slice): {subject, src, answers[true], alt (new), rephrase, loc, loc_ans}."""
    subject = r.get("subject")
    answers = r.strings("answers")
    loc = r.get("loc")
    return FactRecord(
        case_id=r.index,
        prompt=r.template("src", subject),
        subject=subject,
        target_true=with_space(answers[0]),
        target_new=with_space(r.get("alt")),
        paraphrase_prompts=r.strings("rephrase"),
        neighborhood_prompts=(loc if loc.rstrip().endswith("?") else loc + "?",),
        neighborhood_target=with_space(r.get("loc_ans")),
        source="zsre",
    )


def parse_easyedit_counterfact(r: RecordReader) -> FactRecord:
    """EasyEdit's CounterFact: {case_id?, prompt (subject written in), subject, target_new,
    ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth}."""
    subject = r.get("subject")
    truth = r.get("ground_truth", (str, list))
    if isinstance(truth, list):
        truth = r.strings("ground_truth")[0]
    case_id = r.get("case_id", int) if "case_id" in r.raw else r.index
    return FactRecord(
        case_id=case_id,
        prompt=r.template("prompt", subject),
        subject=subject,
        target_true=with_space(truth),
        target_new=with_space(r.get("target_new")),
        paraphrase_prompts=r.strings("rephrase_prompt", required=False),
        neighborhood_prompts=r.strings("locality_prompt", required=False),
        neighborhood_target=with_space(r.get("locality_ground_truth")) if "locality_prompt" in r.raw else None,
        source="counterfact-easyedit",
    )


PARSERS: dict[str, Callable[[RecordReader], FactRecord]] = {
    "counterfact": parse_counterfact,
    "known_1000": parse_known,
    "zsre": parse_zsre,
    "counterfact-easyedit": parse_easyedit_counterfact,
}


def read_json_records(path: Path) -> list:
    """A JSON list of records, or JSON Lines (one record per line)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise TracekitError(f"cannot read {path}: {err.strerror}") from None
    try:
        if Path(path).suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise TracekitError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from None
    if not isinstance(data, list):
        raise TracekitError(f"{path} holds a JSON {type(data).__name__}; expected a list of records")
    return data


# Built in, needing no file: hand-written facts for running the study offline.
BUILTIN_DATASETS = {"worldfacts": world_facts}


def load_dataset(name: str, path: str | os.PathLike | None = None, n: int | None = None,
                 *, download: bool = False) -> list[FactRecord]:
    """The first ``n`` records (all if None) of dataset ``name``, normalised to ``FactRecord``."""
    if name in BUILTIN_DATASETS:
        records = BUILTIN_DATASETS[name]()
        if n is not None and not 1 <= n <= len(records):
            raise TracekitError(f"n must be between 1 and {len(records)} for the built-in {name!r} facts, got {n}")
        return records[:n]
    spec = dataset_files(name)
    file = find_data_file(spec.name, path, download=download)
    raw = read_json_records(file)
    if n is not None:
        if n < 1:
            raise TracekitError(f"n must be at least 1, got {n}")
        if n > len(raw):
            raise TracekitError(f"asked for {n} {spec.name} records but {file} holds only {len(raw)}; use n <= {len(raw)}")
        raw = raw[:n]
    if not raw:
        raise TracekitError(f"{file} holds no records")
    _check_format(spec.name, raw[0], file)
    parse = PARSERS[spec.name]
    records = [parse(RecordReader(spec.name, file, i, item)) for i, item in enumerate(raw)]
    _check_unique_ids(records, file)
    return records


# A field only one format has: a file of another format is named as such, not as a bad record.
SIGNATURES = {"counterfact": "requested_rewrite", "known_1000": "known_id", "zsre": "loc_ans",
              "counterfact-easyedit": "ground_truth"}


def _check_format(name: str, first, file) -> None:
    if not isinstance(first, dict) or SIGNATURES[name] in first:
        return
    for other, field in SIGNATURES.items():
        if other != name and field in first:
            raise TracekitError(f"{file} looks like the {other} format (its records have '{field}'), "
                                f"not {name}; load it as dataset '{other}'")


def _check_unique_ids(records: list[FactRecord], file) -> None:
    seen: dict[int, int] = {}
    for i, record in enumerate(records):
        if record.case_id in seen:
            raise TracekitError(f"{record.source} record {i} in {file}: field 'case_id' repeats {record.case_id} "
                                f"(also record {seen[record.case_id]}); results are stored by case id, so ids must be unique")
        seen[record.case_id] = i


def load_counterfact(path=None, n=None, *, download=False) -> list[FactRecord]:
    return load_dataset("counterfact", path, n, download=download)


def load_known(path=None, n=None, *, download=False) -> list[FactRecord]:
    return load_dataset("known_1000", path, n, download=download)


def load_zsre(path=None, n=None, *, download=False) -> list[FactRecord]:
    return load_dataset("zsre", path, n, download=download)


def load_easyedit_counterfact(path=None, n=None) -> list[FactRecord]:
    return load_dataset("counterfact-easyedit", path, n)


def parse_record(raw, where: str = "the given record") -> FactRecord:
    """One raw record of any supported format, told apart by ``SIGNATURES`` (EasyEdit's flat
    CounterFact is recognised by its 'ground_truth', not misread as ROME's nested CounterFact)."""
    if not isinstance(raw, dict):
        raise TracekitError(f"expected a FactRecord, an EditRequest or a dataset record (a dict), "
                            f"got a {type(raw).__name__}")
    for name, field in SIGNATURES.items():
        if field in raw:
            return PARSERS[name](RecordReader(name, where, 0, raw))
    if "target_new" in raw and "prompt" in raw and "subject" in raw:  # EasyEdit without its ground truth
        return parse_easyedit_counterfact(RecordReader("counterfact-easyedit", where, 0, raw))
    raise TracekitError(f"{where} is in no known format: it has {', '.join(sorted(raw)[:8])}; expected one of "
                        + ", ".join(f"{name} (with '{field}')" for name, field in SIGNATURES.items()))
