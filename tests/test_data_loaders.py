"""Dataset loaders: normalised records, malformed records named by index and field, file lookup."""

import copy
import dataclasses
import hashlib
import json

import pytest

from tracekit import TracekitError
from tracekit.data import FactRecord, find_data_file, load_dataset
from tracekit.data import locate
from tracekit.editing.request import EditRequest


def counterfact(i, subject="Danielle Darrieux"):
    return {"case_id": i, "pararel_idx": 7, "requested_rewrite": {
        "prompt": "The mother tongue of {} is", "relation_id": "P103", "subject": subject,
        "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}},
        "paraphrase_prompts": ["Shayna does this. Danielle Darrieux spoke the language"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Raymond Barre is a native speaker of"],
        "attribute_prompts": [], "generation_prompts": []}


def known(i):
    return {"known_id": i, "subject": "Vinson Massif", "attribute": "Antarctica",
            "template": "{} is located in the continent of", "prediction": " Antarctica",
            "prompt": "Vinson Massif is located in the continent of", "relation_id": "P30"}


def zsre(i):
    return {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
            "pred": "Trinity College", "rephrase": "What university did Watts Humphrey take part in?",
            "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
            "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving",
            "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?"}


def easyedit(i):
    return {"case_id": i, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
            "target_new": "English", "ground_truth": "French",
            "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
            "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}


MAKERS = {"counterfact": counterfact, "known_1000": known, "zsre": zsre, "counterfact-easyedit": easyedit}
# (dataset, corruption applied to record 2, field named in the error)
MALFORMED = [
    ("counterfact", lambda r: r["requested_rewrite"].pop("subject"), "requested_rewrite.subject"),
    ("counterfact", lambda r: r["requested_rewrite"]["target_new"].update(str=5), "requested_rewrite.target_new.str"),
    ("counterfact", lambda r: r.update(paraphrase_prompts=["fine", ""]), "paraphrase_prompts[1]"),
    ("counterfact", lambda r: r["requested_rewrite"].update(prompt="The mother tongue of someone is"),
     "requested_rewrite.prompt"),
    ("known_1000", lambda r: r.update(attribute="  "), "attribute"),
    ("known_1000", lambda r: r.update(known_id="3"), "known_id"),
    ("zsre", lambda r: r.update(answers=[]), "answers"),
    ("zsre", lambda r: r.update(src="Which college did he attend?"), "src"),
    ("counterfact-easyedit", lambda r: r.pop("target_new"), "target_new"),
    ("counterfact-easyedit", lambda r: r.update(ground_truth=None), "ground_truth"),
]


def write(path, records):
    path.write_text(json.dumps(records))
    return path


def test_counterfact_record_is_normalised(tmp_path):
    path = write(tmp_path / "counterfact.json", [counterfact(0), counterfact(1, "Toko Yasuda")])
    records = load_dataset("counterfact", path)
    r = records[1]
    assert isinstance(r, FactRecord)
    assert (r.case_id, r.prompt, r.subject) == (1, "The mother tongue of {} is", "Toko Yasuda")
    assert (r.target_true, r.target_new, r.relation_id, r.source) == (" French", " English", "P103", "counterfact")
    assert r.text == "The mother tongue of Toko Yasuda is"
    assert len(r.paraphrase_prompts) == 1 and len(r.neighborhood_prompts) == 2
    assert r.neighborhood_answer == " French"
    request = EditRequest.from_record(r)
    assert (request.text, request.target) == ("The mother tongue of Toko Yasuda is", " English")


def test_other_formats_are_normalised(tmp_path):
    k = load_dataset("known_1000", write(tmp_path / "k.json", [known(0)]))[0]
    assert (k.prompt, k.target_true, k.target_new, k.case_id) == ("{} is located in the continent of", " Antarctica",
                                                                  None, 0)
    z = load_dataset("zsre", write(tmp_path / "z.json", [zsre(0), zsre(1)]))[1]
    assert (z.case_id, z.prompt, z.subject) == (1, "What university did {} attend?", "Watts Humphrey")
    assert (z.target_true, z.target_new) == (" Illinois Institute of Technology", " University of Michigan")
    assert z.neighborhood_prompts == ("nq question: who played desmond doss father in hacksaw ridge?",)
    assert z.neighborhood_answer == " Hugo Weaving"
    e = load_dataset("counterfact-easyedit", write(tmp_path / "e.json", [easyedit(4)]))[0]
    assert (e.case_id, e.prompt, e.target_true, e.target_new) == (4, "The mother tongue of {} is", " French", " English")
    assert e.paraphrase_prompts == ("Where Danielle Darrieux is from, people speak the language of",)
    assert e.neighborhood_answer == " French"


@pytest.mark.parametrize("name,corrupt,field", MALFORMED)
def test_malformed_record_is_named_by_index_and_field(tmp_path, name, corrupt, field):
    records = [MAKERS[name](i) for i in range(4)]
    corrupt(records[2])
    path = write(tmp_path / f"{name}.json", records)
    with pytest.raises(TracekitError) as err:
        load_dataset(name, path)
    message = str(err.value)
    assert "record 2 " in message and f"field '{field}'" in message and "\n" not in message


def test_record_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "cf.json", [counterfact(0), "oops"])
    with pytest.raises(TracekitError, match=r"record 1 .* is a str, not a JSON object"):
        load_dataset("counterfact", path)


def test_repeated_case_id_is_rejected(tmp_path):
    path = write(tmp_path / "cf.json", [counterfact(0), counterfact(1), counterfact(1)])
    with pytest.raises(TracekitError, match=r"record 2 .*'case_id' repeats 1 \(also record 1\)"):
        load_dataset("counterfact", path)


def test_wrong_format_and_bad_json(tmp_path):
    path = write(tmp_path / "x.json", [easyedit(0)])
    with pytest.raises(TracekitError, match="looks like the counterfact-easyedit format"):
        load_dataset("counterfact", path)
    (tmp_path / "bad.json").write_text('[{"case_id": 1,}]')
    with pytest.raises(TracekitError, match=r"not valid JSON \(line 1"):
        load_dataset("counterfact", tmp_path / "bad.json")
    write(tmp_path / "obj.json", {"data": []})
    with pytest.raises(TracekitError, match="expected a list of records"):
        load_dataset("counterfact", tmp_path / "obj.json")


def test_n_limits_and_rejects_too_many(tmp_path):
    path = write(tmp_path / "cf.json", [counterfact(i) for i in range(5)])
    assert [r.case_id for r in load_dataset("counterfact", path, n=3)] == [0, 1, 2]
    with pytest.raises(TracekitError, match="asked for 6 counterfact records but .* holds only 5"):
        load_dataset("counterfact", path, n=6)
    # only the first n records are read: a bad record after them does not matter
    records = [counterfact(i) for i in range(5)]
    records[4]["requested_rewrite"].pop("prompt")
    assert len(load_dataset("counterfact", write(tmp_path / "cf2.json", records), n=4)) == 4


def test_lookup_order_and_missing_file_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACEKIT_CACHE", str(tmp_path / "cache"))
    # ../shared/data beside the checkout may hold zsRE files: look only inside tmp_path
    monkeypatch.setattr(locate, "repo_root", lambda: tmp_path / "checkout")
    monkeypatch.chdir(tmp_path)
    env = tmp_path / "env"
    env.mkdir()
    monkeypatch.setenv("TRACEKIT_DATA", str(env))
    with pytest.raises(TracekitError) as err:
        find_data_file("zsre", tmp_path / "given")
    message = str(err.value)
    for place in (tmp_path / "given" / "zsre_mend_eval.json", env / "zsre_mend_eval.json",
                  locate.repo_root().parent / "shared" / "data" / "zsre_mend_eval.json",
                  tmp_path / "cache" / "data" / "zsre_mend_eval.json"):
        assert str(place) in message
    assert "--download" in message and "\n" not in message
    write(env / "zsre_mem_eval.json", [zsre(0)])  # the alternative file name, found through $TRACEKIT_DATA
    assert find_data_file("zsre") == env / "zsre_mem_eval.json"
    given = tmp_path / "given"
    given.mkdir()
    write(given / "zsre_mend_eval.json", [zsre(0)])  # a path given by the user comes first
    assert find_data_file("zsre", given) == given / "zsre_mend_eval.json"
    with pytest.raises(TracekitError, match="unknown dataset 'wiki'"):
        find_data_file("wiki")


def test_download_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TRACEKIT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    # ../shared/data beside the checkout may hold a real known_1000.json: look only inside tmp_path
    monkeypatch.setattr(locate, "repo_root", lambda: tmp_path / "checkout")
    calls = []

    class Response:
        def __init__(self, url):
            calls.append(url)
            self.data = json.dumps([known(0), known(1)]).encode()

        def read(self, n=-1):
            data, self.data = (self.data, b"") if n < 0 else (self.data[:n], self.data[n:])
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(locate.urllib.request, "urlopen", lambda url, timeout: Response(url))
    folder = tmp_path / "mine"
    with pytest.raises(TracekitError, match="no known_1000 file found"):
        load_dataset("known_1000", folder)
    assert calls == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TracekitError, match="offline"):
        load_dataset("known_1000", folder, download=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(TracekitError, match="does not match its pinned sha256"):
        load_dataset("known_1000", folder, download=True)  # the fake file is not ROME's
    assert not list(folder.glob("*"))  # nothing kept
    fake = hashlib.sha256(json.dumps([known(0), known(1)]).encode()).hexdigest()
    monkeypatch.setitem(locate.DATASETS, "known_1000",
                        dataclasses.replace(locate.DATASETS["known_1000"], digest=("sha256", fake)))
    calls.clear()
    records = load_dataset("known_1000", folder, download=True)
    assert calls == ["https://rome.baulab.info/data/dsets/known_1000.json"]
    assert len(records) == 2 and (folder / "known_1000.json").is_file()
    assert not list(folder.glob("*.part"))
    assert len(load_dataset("known_1000", folder)) == 2 and len(calls) == 1  # found locally now


def test_records_are_frozen(tmp_path):
    r = load_dataset("counterfact", write(tmp_path / "cf.json", [counterfact(0)]))[0]
    with pytest.raises(AttributeError):
        r.subject = "x"
    assert copy.deepcopy(r) == r


def test_builtin_world_facts_need_no_file():
    records = load_dataset("worldfacts", n=5)
    assert len(records) == 5 and all("{}" in r.prompt and r.target_true.startswith(" ") for r in records)
    assert len({r.case_id for r in load_dataset("worldfacts")}) == len(load_dataset("worldfacts"))
    with pytest.raises(TracekitError, match="n must be between 1 and"):
        load_dataset("worldfacts", n=10**6)


def test_easyedit_parts_are_read_together_in_case_order(tmp_path, monkeypatch):
    folder = tmp_path / "counterfact_easyedit"
    folder.mkdir()
    write(folder / "counterfact-edit.json", [easyedit(i) for i in (1, 4)])
    write(folder / "counterfact-train.json", [easyedit(i) for i in (0, 3)])
    write(folder / "counterfact-val.json", [easyedit(2)])
    monkeypatch.setenv("TRACEKIT_DATA", str(tmp_path))  # found through the sub-folder ../shared/data uses
    records = load_dataset("counterfact-easyedit")
    assert [r.case_id for r in records] == [0, 1, 2, 3, 4]
    assert [r.case_id for r in load_dataset("counterfact-easyedit", n=2)] == [0, 1]
    assert records[0].prompt_sets == "1 rephrase_prompt, 1 locality_prompt"
    # a file named directly is read alone
    assert [r.case_id for r in load_dataset("counterfact-easyedit", folder / "counterfact-edit.json")] == [1, 4]
    write(folder / "counterfact-val.json", [easyedit(3)])  # a case in two parts is named with both files
    with pytest.raises(TracekitError, match=r"repeats 3 \(also record 1 in .*counterfact-train.json\)"):
        load_dataset("counterfact-easyedit")


def test_counterfact_comes_in_case_order_and_says_its_prompts(tmp_path, monkeypatch):
    folder = tmp_path / "counterfact"
    folder.mkdir()
    write(folder / "intersected_counterfact_known.json", [counterfact(i) for i in (7, 2, 5)])
    monkeypatch.setenv("TRACEKIT_DATA", str(tmp_path))  # the 436-record subset's place in ../shared/data
    records = load_dataset("counterfact", n=2)
    assert [r.case_id for r in records] == [2, 5]
    assert records[0].prompt_sets == "1 paraphrase_prompts, 2 neighborhood_prompts"
    write(tmp_path / "counterfact.json", [counterfact(i) for i in range(4)])  # the full file comes first
    assert len(load_dataset("counterfact")) == 4


def shared_data_folder():
    for folder in locate.search_folders():
        if (folder / "counterfact" / "intersected_counterfact_known.json").is_file():
            return folder
    pytest.skip("../shared/data (CounterFact in both formats) is not beside this checkout or in $TRACEKIT_DATA")


def test_shared_counterfact_formats_give_the_same_rewrites():
    folder = shared_data_folder()
    original = load_dataset("counterfact", folder)
    easyedit_records = {r.case_id: r for r in load_dataset("counterfact-easyedit", folder)}
    assert len(original) == 436 and len(easyedit_records) == 21919
    assert sorted(easyedit_records) == list(range(21919))
    for r in original:
        e = easyedit_records[r.case_id]
        assert (e.subject, e.prompt, e.text, e.target_new, e.target_true) == (
            r.subject, r.prompt, r.text, r.target_new, r.target_true), r.case_id
        assert r.prompt_sets == "2 paraphrase_prompts, 10 neighborhood_prompts"
        assert e.prompt_sets == "1 rephrase_prompt, 1 locality_prompt"
        assert e.neighborhood_prompts[0] in r.neighborhood_prompts and e.neighborhood_answer == r.target_true
    rephrase_is_paraphrase = sum(easyedit_records[r.case_id].paraphrase_prompts[0] in r.paraphrase_prompts
                                 for r in original)
    assert rephrase_is_paraphrase == 73  # the other 363 are ROME generation prompts (SOURCES.md)
    assert len(load_dataset("known_1000", folder)) == 1209
    assert len(load_dataset("zsre", folder)) == 1037  # the eval subset with portability questions
    train = folder / "zsre" / "zsre_mend_train-1k.json"  # read by path; two of its records have no new answer
    with pytest.raises(TracekitError, match=r"zsre record 534 in .*zsre_mend_train-1k.json: field 'alt' is empty"):
        load_dataset("zsre", train)
    assert len(load_dataset("zsre", train, n=534)) == 534


def test_pinned_digests_match_the_shared_copies():
    """The pins are those of the public files; where the same file is in ../shared/data, check it."""
    known_file = locate.repo_root().parent / "shared" / "data" / "known_1000.json"
    if not known_file.is_file():
        pytest.skip("../shared/data is not beside this checkout")
    assert locate.file_digest(known_file, "sha256") == locate.DATASETS["known_1000"].digest[1]
    git_blob = locate.file_digest(known_file, "git-blob")
    assert git_blob == "6c711e97d27581fe837009b683684f23fa50a634"  # the blob id SOURCES.md gives
