"""Result stores: a bad path, a foreign file, a bogus journal mode or table name is a one-line
error; a failed merge leaves no empty output store behind."""

import sqlite3

import pytest

from tracekit import TracekitError
from tracekit.cli import main
from tracekit.store import ResultStore, merge_stores


def _foreign(tmp_path):
    path = tmp_path / "notes.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (x)")
    conn.commit()
    conn.close()
    return path


def _not_sqlite(tmp_path):
    path = tmp_path / "text.sqlite"
    path.write_text("this is not a database\n" * 100)
    return path


def _folder(tmp_path):
    (tmp_path / "dir.sqlite").mkdir()
    return tmp_path / "dir.sqlite"


BAD = {"not SQLite": (_not_sqlite, "is not a tracekit result store"),
       "a folder": (_folder, "is a folder"),
       "another SQLite file": (_foreign, "is an SQLite file but not a tracekit result store")}


@pytest.mark.parametrize("readonly", [False, True])
@pytest.mark.parametrize("case", list(BAD))
def test_a_path_that_is_not_a_store_is_a_one_line_error(tmp_path, case, readonly):
    make, message = BAD[case]
    path = make(tmp_path)
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(TracekitError, match=message) as err:
        ResultStore(path, readonly=readonly)
    assert "\n" not in str(err.value)
    assert (path.read_bytes() if path.is_file() else None) == before  # nothing written into it


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("argv", [["store", "show", "{}"], ["store", "export", "{}", "--out", "OUT"],
                                  ["store", "merge", "OUT.sqlite", "{}"]])
def test_store_commands_on_a_non_store_print_one_line(tmp_path, capsys, case, argv):
    path = BAD[case][0](tmp_path)
    argv = [a.replace("{}", str(path)).replace("OUT", str(tmp_path / "out")) for a in argv]
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert out.startswith("error:") and "Traceback" not in out
    assert not (tmp_path / "out.sqlite").exists()


def test_bogus_journal_mode_is_an_error_not_a_silent_downgrade(tmp_path):
    with pytest.raises(TracekitError, match="unknown journal mode 'bogus'"):
        ResultStore(tmp_path / "s.sqlite", journal="bogus")
    assert not (tmp_path / "s.sqlite").exists()
    with ResultStore(tmp_path / "s.sqlite", journal="delete") as store:
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


@pytest.mark.parametrize("call", [lambda s: s.count("edits; DROP TABLE edits"), lambda s: s.delete_failed("nope"),
                                  lambda s: s.frame("sqlite_master"), lambda s: s.done_keys("manifest")])
def test_table_names_are_checked(tmp_path, call):
    with ResultStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(TracekitError, match="unknown result table"):
            call(store)
        assert store.count("edits") == 0  # still there


def test_a_failed_merge_leaves_no_output_store(tmp_path):
    good = tmp_path / "a.sqlite"
    with ResultStore(good) as store:
        store.begin("edit", {"x": 1})
    other = tmp_path / "b.sqlite"
    with ResultStore(other) as store:
        store.begin("edit", {"x": 2})  # same sweep, other settings: the merge must stop
    out = tmp_path / "merged.sqlite"
    with pytest.raises(TracekitError, match="other settings"):
        merge_stores(out, [good, other])
    assert not out.exists() and not list(tmp_path.glob("merged.sqlite*"))
    with pytest.raises(TracekitError):
        merge_stores(out, [good, _not_sqlite(tmp_path)])
    assert not list(tmp_path.glob("merged.sqlite*"))


def test_a_failed_merge_into_an_existing_store_keeps_its_rows(tmp_path):
    out = tmp_path / "merged.sqlite"
    with ResultStore(out) as store:
        store.begin("edit", {"x": 1})
    other = tmp_path / "b.sqlite"
    with ResultStore(other) as store:
        store.begin("edit", {"x": 2})
    with pytest.raises(TracekitError):
        merge_stores(out, [other])
    with ResultStore(out, readonly=True) as store:
        assert list(store.manifests()) == ["edit"]
