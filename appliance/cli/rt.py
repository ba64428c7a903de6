"""``appliance rt-export``: RT Dose per ROI on the series' grid, written to USB or sent."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from appliance.cli.common import load_config, open_store
from appliance.cli.net import client_options, peer_from, quiet_pynetdicom, secured, tls_option
from appliance.dicom import dosegrid
from appliance.net import sender
from appliance.reports import item_printer, progress_printer
from appliance.rt.inputs import VOLUME_UNITS, read_dose
from appliance.rt.rtexport import GridOptions, build, send, write_usb


def cmd_rt_export(args: argparse.Namespace) -> int:
    """Build the per-ROI RT Doses and the RT Plan, then send or write them with their series."""
    parser: argparse.ArgumentParser = args.rt_parser
    targets = [bool(args.to), args.host is not None, bool(args.dest)]
    if sum(targets) != 1:
        parser.error("give exactly one of --to DIR|DEVICE, HOST PORT or --dest NAME")
    if args.host is not None and args.port is None:
        parser.error("give HOST and PORT")
    cfg = load_config(args)
    peer = peer_from(cfg, args.dest, args.aec, args.host, args.port) if args.dest or args.host is not None else None
    settings = sender.ClientSettings(args.aet, args.pdu, args.timeout)
    if peer is not None:
        peer, settings = secured(args, cfg, peer, settings)  # [tls] for a TLS destination (or --tls)
        settings.check()
        sender.check_peer(peer)
        quiet_pynetdicom(args)
    dose = read_dose(Path(args.dose), units=args.dose_units, frame_of_reference=args.dose_frame_of_reference)
    options = GridOptions(tuple(args.pixel_spacing) if args.pixel_spacing else None, args.slice_spacing,
                          args.interpolation)
    store = open_store(args, cfg)
    try:
        made = build(store, args.series, args.structure_set, dose, rois=args.roi,
                     registration=Path(args.registration) if args.registration else None, options=options)
        print(made.render(), flush=True)
        if peer is not None:
            report = send(store, made, peer, settings, progress=item_printer(sys.stdout))
            print(report.summary())
            return 0 if report.ok else 1
        usb = write_usb(Path(args.to), store, cfg, made, progress=progress_printer(sys.stderr))
        print(usb.render(), flush=True)
        return 0 if usb.ok else 1
    finally:
        store.close(clean=False)


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "rt-export", help="resample a dose onto the series' grid per ROI (RT Dose) with an RT Plan, and export them",
        usage="appliance rt-export --series UID --structure-set UID --dose FILE [--roi NAME ...] "
              "(--to DIR|DEVICE | HOST PORT [-aec AET] | --dest NAME) [options]",
    )
    p.add_argument("--series", required=True, metavar="UID", help="the stored image series")
    p.add_argument("--structure-set", required=True, metavar="UID", help="the stored RT Structure Set (SOP Instance UID)")
    p.add_argument("--dose", required=True, metavar="FILE",
                   help="the dose: an RT Dose file, or a NIfTI/MetaImage volume (then --dose-units and "
                        "--dose-frame-of-reference are needed)")
    p.add_argument("--roi", action="append", default=[], metavar="NAME",
                   help="an ROI to make a dose for (repeatable; default: every closed-planar ROI)")
    p.add_argument("--dose-units", type=str.upper, choices=sorted(VOLUME_UNITS), metavar="GY|CGY",
                   help="the units of a volume file's values")
    p.add_argument("--dose-frame-of-reference", metavar="UID", help="the Frame of Reference a volume file is in")
    p.add_argument("--registration", metavar="FILE",
                   help="a Spatial Registration object relating the dose's frame of reference to the series'")
    p.add_argument("--pixel-spacing", type=float, nargs=2, metavar=("ROW", "COL"),
                   help="in-plane spacing of the dose grids in mm (default: the series' Pixel Spacing)")
    p.add_argument("--slice-spacing", type=float, metavar="MM",
                   help="evenly spaced dose planes from the first slice (default: the series' slice positions)")
    p.add_argument("--interpolation", choices=dosegrid.METHODS, default="linear",
                   help="how dose values are interpolated (default linear, i.e. trilinear)")
    p.add_argument("--to", metavar="DIR|DEVICE", help="write to a USB target (a folder, a USB block device, a FAT image)")
    p.add_argument("--dest", metavar="NAME", help="send to a destination named in the config file")
    client_options(p, sender.DEFAULT_SEND_TIMEOUT)
    tls_option(p)
    p.add_argument("host", nargs="?", metavar="HOST")
    p.add_argument("port", nargs="?", type=int, metavar="PORT")
    p.set_defaults(func=cmd_rt_export, rt_parser=p)
