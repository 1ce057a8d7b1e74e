import os

import pytest

from data_pipeline import atomic


def test_write_text_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    atomic.write_json(str(path), {"b": 1, "a": 2}, durable=True)
    assert path.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    assert os.listdir(tmp_path) == ["summary.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        atomic.write_json(str(path), {"x": object()})
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_staged_dir_replaces_the_old_folder_only_when_complete(tmp_path):
    final = tmp_path / "export"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic.staged_dir(str(final)) as tmp:
        (tmp_path / os.path.basename(tmp) / "new.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert sorted(os.listdir(tmp_path)) == ["export"]
    assert os.listdir(final) == ["old.txt"]
    with atomic.staged_dir(str(final)) as tmp:
        (tmp_path / os.path.basename(tmp) / "new.txt").write_text("new")
        assert os.listdir(final) == ["old.txt"]  # the old one stays readable until the end
    assert sorted(os.listdir(tmp_path)) == ["export"]
    assert os.listdir(final) == ["new.txt"]


def test_replace_dir_puts_the_old_folder_back_when_the_new_one_cannot_take_its_place(tmp_path):
    final = tmp_path / "export"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(FileNotFoundError):
        atomic.replace_dir(str(tmp_path / "export.tmp-1"), str(final))  # the second rename fails: no such folder
    assert sorted(os.listdir(tmp_path)) == ["export"]
    assert os.listdir(final) == ["old.txt"]


def test_recover_dir_puts_back_what_a_kill_between_the_renames_set_aside(tmp_path):
    for name, text in (("export.old-11", "old"), ("export.tmp-11", "new, never renamed"),
                       ("export.tmp-7", "cut short"), ("export-best", "another folder")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.txt").write_text(text)
    atomic.recover_dir(str(tmp_path / "export"))
    assert sorted(os.listdir(tmp_path)) == ["export", "export-best"]
    assert (tmp_path / "export" / "f.txt").read_text() == "old"
    # A kill after the second rename: the new folder is in place, the old one only has to go.
    (tmp_path / "export.old-12").mkdir()
    atomic.recover_dir(str(tmp_path / "export"))
    assert sorted(os.listdir(tmp_path)) == ["export", "export-best"]
    assert (tmp_path / "export" / "f.txt").read_text() == "old"
    atomic.recover_dir(str(tmp_path / "missing" / "export"))  # no parent folder: nothing to do


def test_on_root_gives_every_rank_the_result_or_the_error():
    from data_pipeline.collective import on_root

    sent = []

    def bcast(value):  # rank 0's value reaches "every rank"
        sent.append(value)
        return sent[0]

    assert on_root(True, bcast, lambda: 7, ValueError) == 7
    assert on_root(False, bcast, lambda: 1 / 0, ValueError) == 7  # only rank 0 runs fn
    sent.clear()

    def fail():
        raise OSError(28, "No space left on device", "out")

    with pytest.raises(ValueError, match="no space: 'out'"):
        on_root(True, bcast, fail, ValueError, catch=(OSError,), describe=lambda e: f"no space: {e.filename!r}")
    with pytest.raises(ValueError, match="no space: 'out'"):
        on_root(False, bcast, lambda: 3, ValueError)
    sent.clear()

    def bug():
        raise KeyError("class_names")

    # Not bad input: rank 0 keeps its traceback, the others still end, with one line naming it.
    with pytest.raises(KeyError):
        on_root(True, bcast, bug, ValueError, catch=(OSError,))
    with pytest.raises(ValueError) as e:
        on_root(False, bcast, lambda: 3, ValueError)
    assert str(e.value) == "rank 0 failed: KeyError: 'class_names'"
