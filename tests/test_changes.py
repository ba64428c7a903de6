"""The forwarder's wake-up: a write to a file in the watched folder, or a poke, ends a wait;
nothing else does."""

from __future__ import annotations

import threading
from pathlib import Path

from appliance.jobs import changes


def test_a_write_in_the_folder_or_a_poke_ends_the_wait(tmp_path: Path) -> None:
    (tmp_path / "index.sqlite-wal").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    w = changes.watch(tmp_path)
    assert w is not None
    try:
        assert not w.wait(0.05), "nothing happened"
        with open(tmp_path / "index.sqlite-wal", "ab") as f:
            f.write(b"x")
        assert w.wait(5)
        assert not w.wait(0.05), "the events were consumed"
        (tmp_path / "sub" / "file").write_bytes(b"x")  # below the folder: not watched
        assert not w.wait(0.05)
        threading.Thread(target=w.poke).start()
        assert w.wait(5)
    finally:
        w.close()
    w.poke()  # closed: nothing happens, no descriptor is written to
    w.close()


def test_a_folder_that_cannot_be_watched_gives_none(tmp_path: Path) -> None:
    assert changes.watch(tmp_path / "missing") is None
