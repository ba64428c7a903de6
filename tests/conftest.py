from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest

from appliance.config import Config, ScpConfig, StoreConfig
from appliance.store.ingest import Ingest
from appliance.net.scp import StorageServer
from appliance.store.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "data")
    yield s
    s.index.close()


@pytest.fixture
def rules() -> StoreConfig:
    return StoreConfig(min_free_mb=0)


@pytest.fixture
def ingest(store: Store, rules: StoreConfig) -> Ingest:
    return Ingest(store, rules)


class RunningServer:
    """An in-process Storage SCP on a free loopback port."""

    def __init__(self, data_dir: Path, scp: ScpConfig, rules: StoreConfig) -> None:
        self.store = Store(data_dir)
        self.store.open_for_service()
        self.server = StorageServer(scp, Ingest(self.store, rules))
        self.where = self.server.start()
        self.port = self.where.port
        self.ae_title = scp.ae_title

    def stop(self) -> None:
        self.server.stop(grace=2)
        self.store.close()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    started: list[RunningServer] = []

    def make(scp: ScpConfig | None = None, rules: StoreConfig | None = None, name: str = "data") -> RunningServer:
        scp_cfg = replace(scp or ScpConfig(), bind="127.0.0.1", port=0)
        srv = RunningServer(tmp_path / name, scp_cfg, rules or StoreConfig(min_free_mb=0))
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def server(make_server) -> RunningServer:  # type: ignore[no-untyped-def]
    return make_server()


@pytest.fixture
def default_config() -> Config:
    return Config()
