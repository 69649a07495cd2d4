"""utils.atomic.atomic_folder: a cache entry appears complete or not at all, and a concurrent writer's complete
entry is kept."""
import pytest

from utils.atomic import atomic_folder


def test_a_filled_folder_is_renamed_into_place_and_nothing_else_is_left(tmp_path):
    target = tmp_path / "cache" / "case-1"
    with atomic_folder(target) as tmp:
        assert tmp.parent == target.parent and not target.exists()
        (tmp / "meta.json").write_text("{}")
    assert (target / "meta.json").read_text() == "{}"
    assert sorted(p.name for p in target.parent.iterdir()) == ["case-1"]


def test_a_failure_while_filling_leaves_no_entry(tmp_path):
    target = tmp_path / "case-1"
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "image.npy").write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_a_complete_entry_written_first_by_another_process_is_kept(tmp_path):
    target = tmp_path / "case-1"
    with atomic_folder(target) as tmp:
        (tmp / "meta.json").write_text("mine")
        target.mkdir()  # the other process renamed its entry into place meanwhile
        (target / "meta.json").write_text("theirs")
    assert (target / "meta.json").read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["case-1"]


def test_an_incomplete_folder_in_the_way_is_an_error(tmp_path):
    target = tmp_path / "case-1"
    (target / "junk").mkdir(parents=True)
    with pytest.raises(OSError):
        with atomic_folder(target) as tmp:
            (tmp / "meta.json").write_text("mine")
