"""df_mlx.atomic: outputs appear whole or not at all, with umask permissions."""

import os

import pytest

from df_mlx.atomic import atomic_dir, atomic_file, file_identity, is_inside


def _hidden(root):
    return [p for p in os.listdir(root) if p.startswith(".dfmlx-")]


def test_a_failed_file_leaves_the_target_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("stop")
    assert target.read_text() == "old" and not _hidden(tmp_path)


def test_a_failed_folder_leaves_the_target_and_no_temporary(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("half")
            raise KeyboardInterrupt
    assert os.listdir(target) == ["a"] and (target / "a").read_text() == "old" and not _hidden(tmp_path)


def test_a_folder_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old").write_text("x")
    old = os.umask(0o002)
    try:
        with atomic_dir(target) as tmp:
            (tmp / "new").write_text("y")
    finally:
        os.umask(old)
    assert os.listdir(target) == ["new"] and target.stat().st_mode & 0o777 == 0o775 and not _hidden(tmp_path)


def test_errors_name_the_target_not_the_temporary(tmp_path):
    with pytest.raises(OSError) as e:
        with atomic_file(tmp_path / "missing" / "out.wav"):
            pass
    assert e.value.filename == str(tmp_path / "missing" / "out.wav")


def test_paths_compare_through_links(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    (tmp_path / "l").symlink_to(tmp_path / "d")
    os.link(tmp_path / "d" / "f", tmp_path / "hard")
    f = file_identity(tmp_path / "d" / "f")
    assert file_identity(tmp_path / "l" / "f") == f == file_identity(tmp_path / "hard")
    assert file_identity(tmp_path / "l" / "new") == file_identity(tmp_path / "d" / "new")  # not there yet
    assert is_inside(tmp_path / "l" / "f", tmp_path / "d") and is_inside(tmp_path / "d", tmp_path / "d")
    assert not is_inside(tmp_path / "d", tmp_path / "d" / "f")
