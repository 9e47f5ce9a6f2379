"""Atomic writes leave files and folders with the permissions a plain write would give."""

import os
import stat

from flipad_jax._files import atomic_dir, atomic_file


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    (tmp_path / "plain.txt").write_text("x")      # what open() makes under this umask
    (tmp_path / "plain_dir").mkdir()
    with atomic_file(tmp_path / "atomic.txt") as tmp:
        tmp.write_text("x")
    with atomic_dir(tmp_path / "atomic_dir") as tmp:
        (tmp / "f").write_text("x")

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    assert mode(tmp_path / "atomic.txt") == mode(tmp_path / "plain.txt")
    assert mode(tmp_path / "atomic_dir") == mode(tmp_path / "plain_dir")
