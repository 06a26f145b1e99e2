"""rlvrw.files: the cache directory and writes that readers see whole or not at all."""

import json

import pytest

from rlvrw import files


def failing(*_):
    raise RuntimeError("disk full")


def test_write_file_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "sub" / "state.json"
    files.write_json(target, {"v": 1})

    def half_then_fail(f):
        f.write(b"half")
        failing()

    with pytest.raises(RuntimeError):
        files.write_file(target, half_then_fail)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]  # no temporary left behind


def test_write_directory_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    files.write_directory(target, lambda d: (d / "a.txt").write_text("one"))
    files.write_directory(target, lambda d: (d / "b.txt").write_text("two"))
    assert sorted(p.name for p in target.iterdir()) == ["b.txt", files.MANIFEST_FILE]  # replaced, not merged

    def half_then_fail(d):
        (d / "c.txt").write_text("half")
        failing()

    with pytest.raises(RuntimeError):
        files.write_directory(target, half_then_fail)
    assert sorted(p.name for p in target.iterdir()) == ["b.txt", files.MANIFEST_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_publish_directory_puts_the_old_one_back_when_the_rename_fails(tmp_path, monkeypatch):
    final, tmp = tmp_path / "final", tmp_path / "new"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp.mkdir()
    real_replace = files.os.replace

    def replace(src, dst):
        if str(src) == str(tmp):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError):
        files.publish_directory(tmp, final)
    assert (final / "old.txt").read_text() == "old"


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "cache"))
    assert files.cache_dir("lpips") == tmp_path / "cache" / "lpips"
    assert (tmp_path / "cache" / "lpips").is_dir()
