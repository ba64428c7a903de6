"""Throughput benchmark: our Storage SCP against DCMTK's ``storescp``.

What it measures
----------------
DCMTK ``storescu`` sends generated series over loopback (127.0.0.1, Implicit VR Little
Endian, the same max PDU everywhere) to two receivers in turn: ours (``appliance scp``)
and DCMTK ``storescp``. The series are a CT of 300 slices of 512x512 int16 and an MR of
200 slices of 256x256 uint16, generated once with pydicom into a cache directory
(``$XDG_CACHE_HOME`` or ``/tmp``, never the repository). For each series two cases run:

* ``x1``: one storescu sends the whole series over one association;
* ``xN``: the series is split into N contiguous parts (default 5, the appliance's
  association limit) sent by N storescu processes at once; storescp runs with ``--fork``.

Every run starts the receiver afresh on a new, empty output directory and a free port,
waits until it answers C-ECHO (``echoscu``), measures C-ECHO latency, times the storescu
process(es) from launch to exit, stops the receiver with SIGTERM and checks that it
stored exactly as many objects as were sent. DCMTK tools run with ``TCP_NODELAY=1``.
The receivers alternate run by run (and which goes first alternates too), so that drift
on the machine hits both alike; the file system is synced between runs so that one
run's write-back does not land in the next.

Where the receivers write (``--fs``)
------------------------------------
The box stores on its data partition, a journaled ext4 (image/mkosi.repart/20-data.conf,
mounted noatime). By default, when run as root, every receiver's output folder and the
floor's commits are on such a file system: a sparse image file (``--fs-size``, 4 GB) made
with mkfs.ext4 as systemd-repart runs it for the image (``bench/scp/fs.py`` says how, and the
one difference), loop-mounted for the run, and unmounted and removed at the end however the
run ends (a failed run, Ctrl-C, SIGTERM; not SIGKILL). The image file itself lies under
``--work-dir`` (or $TMPDIR), so its writes reach that disk through the loop device. ``--fs
root`` writes to a folder under ``--work-dir`` on whatever file system holds it instead (as
bench-scp did before); without root, or if the mount fails, that is what the default falls
back to, and it says so. The report's ``written to:`` line says which it was.

Reading the results
-------------------
``images/s`` and ``MB/s`` (10^6 bytes of Part 10 files sent) are medians over the
rounds, with min and max. The ratio ours/DCMTK is ours' median images/s over DCMTK's for
the same case: 1.00 is parity, 0.50 means ours takes twice as long to take the same
series, above 1 ours is faster. Both receivers get the same sender, data, PDU and disk,
but not the same work: storescp parses and writes each file, nothing more; ours
validates each object, writes it to a temporary file, fsyncs, renames and indexes it
before it answers. The ratio includes that price of a crash-safe store; that is the
point of measuring against the tool the vendor's own Storage Server was built on.

``peak RSS`` is VmHWM summed over the receiver's processes alive just before it is
stopped, the largest over the rounds. Ours is one process (our acceptor, a thread per association),
so that is its true peak; ``storescp --fork``'s per-association children have exited by
then, so DCMTK's xN figure is the listening parent's alone. ``CPU/img`` is the
user+system CPU time the receiver's process tree spent while storescu ran (reaped
children included) per image, median over rounds; it counts in 10 ms clock ticks, so it
means little for tiny series. ``echo`` is the median round trip of one C-ECHO over an
established association (``--echo-count`` per run), ``assoc`` the median time from
A-ASSOCIATE-RQ to -AC. Both are taken with a minimal raw-socket client
(``bench/echo.py``): pynetdicom's client polls and adds about 3 ms per message, which
would hide the receiver's own latency.

The floor (``--floor``)
----------------------
With one association storescu waits for each answer, so a receiver that answers only once
the object is durable cannot hide the commit behind anything. ``--floor`` measures the two
parts of that least time on the same machine and disk: a third receiver, the sink
(``bench/sink.py``: our acceptor, every data set dropped), gives the time of the sender,
loopback and our protocol code; bare durable commits of a file of the series' object size
(write it to a temp file, rename it into a folder, fsync the file and the folder) give the
cost of durability. Their sum, the floor, is printed next to DCMTK's time per image and
ours: when it is above DCMTK's, parity over one association is out of reach on that machine
for any receiver that commits before it answers, however fast its code. The floor's table
has one row per case: ours, DCMTK, sink, commit and floor in ms per image, ours/floor
(time per image: 1.00 is at the floor), ours/DCMTK (images/s, as above) and each receiver's
CPU per image. Over N associations commits overlap with receiving, so an xN case's
floor is the longer of the sink's time per image and the time per commit with N threads
committing at once (its commit column): what the disk allows a durable receiver there.

``--floor`` also runs a fourth receiver, ``dcmtk+fsync``: DCMTK's own storescp made durable,
with ``bench/scp/fsync_on_close.c`` preloaded (built once into the cache directory with the
machine's C compiler; without one it is left out, and the report says why). The preload
fsyncs every file storescp has written just before it closes it, and storescp closes an
object's file before it answers, so it answers only once the object is on the disk, as ours
does; nothing else changes (it still writes in place, checks and indexes nothing). Its table
gives, per case, DCMTK's, the durable DCMTK's and our time per image, the durable DCMTK's
images/s over DCMTK's (what durability costs storescp itself on this machine), ours over the
durable DCMTK in time per image, both receivers' CPU per image and the durable DCMTK's
journal commits per image (one per image over one association: the fsyncs happened). It
answers "is ours slow, or is durability?" with a receiver written in C++.

This is a benchmark, not a test: it asserts nothing about speed. It exits 1 if any run
failed (a receiver did not start or answer, storescu reported an error, or the number of
stored objects differs from the number sent), 2 on a usage error, else 0.

Usage
-----
It needs DCMTK (storescu, storescp, echoscu) and the project's Python (pydicom, numpy):
run ``scripts/setup-venv`` once; the script switches to ``.venv/bin/python`` by itself.

    scripts/bench-scp                                            # full size, 5 rounds (~1.5 min)
    scripts/bench-scp --ct-slices 30 --mr-slices 20 --rounds 1   # smoke check (~5 s)
    scripts/bench-scp --json /tmp/bench.json                     # also write the results as JSON
    scripts/bench-scp --floor     # also a sink and bare durable commits: what any durable receiver needs
    scripts/bench-scp --fs root   # on the work directory's file system, not an ext4 image
    # another command as "ours", with placeholders {port} {data_dir} {aet} {pdu}
    # {max_associations} {storescp}; what it stores is counted with --ours-count
    # (a glob under {data_dir}, '**/*.dcm' by default with --ours-cmd):
    scripts/bench-scp --ours-cmd '{storescp} --fork -aet {aet} -pdu {pdu} -od {data_dir} -fe .dcm {port}'

The code
--------
``processes`` (the DCMTK tools, a receiver's process, the storescu senders), ``runs`` (one
run of a receiver and a case, the durable commits of ``--floor``), ``fs`` (the ext4 image or
the root folder the receivers write to), ``report`` (the figures and what is printed) and
``command`` (the options and ``main``).
"""

from bench.scp.command import main

__all__ = ["main"]
