"""write_atomic: the target holds the old content or the new one, never a part; no temporary is left."""

from __future__ import annotations

import pytest

from vzoo.atomic import write_atomic


def test_write_atomic_never_leaves_half_files(tmp_path):
    target = tmp_path / "metrics.json"
    write_atomic(target, lambda tmp: tmp.write_text("old"))
    assert target.read_text() == "old"

    def fails(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, fails)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
