"""What every command needs: the data folder, the config file, the store, a text table."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from appliance import config

if TYPE_CHECKING:
    from appliance.store.store import Store


def data_dir(args: argparse.Namespace) -> Path:
    if args.data_dir:
        return Path(args.data_dir)
    return Path(os.environ.get("APPLIANCE_DATA_DIR", str(config.DEFAULT_DATA_DIR)))


def load_config(args: argparse.Namespace) -> config.Config:
    return config.load(Path(args.config) if args.config else None)


def open_store(args: argparse.Namespace, cfg: config.Config | None = None) -> Store:
    from appliance.store.store import Store

    cfg = cfg or load_config(args)
    return Store(data_dir(args), slice_tolerance_mm=cfg.store.slice_tolerance_mm)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    def line(r: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])
