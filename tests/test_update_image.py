"""Firmware updates of the appliance image, in QEMU, the way a technician and IT meet them.

Slow (about 15 minutes under TCG): excluded from the default run; ``scripts/test-update``
builds the releases and runs it. One virtual machine, one qcow2 overlay over the image of
version N (the disk image itself is never written), many boots, in file order:

boot N and store a CT series -> a stick signed by an unknown key is refused -> a stick with
one flipped byte is refused before anything is written -> the power is cut while N+1 is
being written: N boots -> N+1 from a hot-plugged USB stick, confirmed on the console: N+1
boots and is marked good -> N+2 (its appliance never starts) from an HTTP server: it fails
its boot tries and the box rolls back to N+1 by itself -> on the powered-off disk: the store
and the configuration intact, the slots and the UKIs as the updater and the boot loader left them
-> a factory reset on the console, confirmed with the service password set on N (it came along
through the updates), restarts N+1 with an empty store and the default configuration.

Environment (scripts/test-update sets it): ``APPLIANCE_IMAGE`` (version N's disk image),
``APPLIANCE_RELEASE_N1`` and ``APPLIANCE_RELEASE_N2`` (the release folders scripts/build-image
wrote for N+1 and the broken N+2).
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ct_series, write_series
from tests.vm import (
    AET,
    Machine,
    StoreView,
    gpt_names,
    gpt_partition,
    image_path,
    report,
    require_tools,
    run,
)

pytestmark = pytest.mark.slow

#: Boot tries the test gives N+2 (the default is 3): two failed boots, then the rollback.
TRIES = 2


def release_dir(name: str) -> Path:
    path = Path(os.environ.get(name, ""))
    if not (path / "SHA256SUMS.sig").is_file():
        pytest.skip(f"{name} names no release folder: scripts/test-update builds them")
    return path


def version_of(release: Path) -> str:
    m = re.search(r"appliance_(\S+)\.efi$", (release / "SHA256SUMS").read_text(), re.MULTILINE)
    assert m, f"{release}/SHA256SUMS names no UKI"
    return m.group(1)


def make_stick(path: Path, files: dict[str, Path], label: str = "UPDATE") -> Path:
    """A FAT32 stick image holding ``files`` (name on the stick -> file) in appliance-update/."""
    size = sum(f.stat().st_size for f in files.values()) + 64 * 2**20
    size = max(size, 128 * 2**20) // 2**20 * 2**20
    with path.open("wb") as f:
        f.truncate(size)
    run(["mformat", "-i", str(path), "-T", str(size // 512), "-h", "64", "-s", "32", "-F", "-v", label, "::"])
    run(["mmd", "-i", str(path), "::/appliance-update"])
    for name, src in files.items():
        run(["mcopy", "-i", str(path), str(src), f"::/appliance-update/{name}"], timeout=300)
    return path


def release_files(release: Path) -> dict[str, Path]:
    return {p.name: p for p in release.iterdir() if p.is_file()}


class Console:
    """The service console's Updates page (menu u) on ttyS0. Every step starts and ends on
    the main menu; the position read so far is the machine's (``vm.console_at``), so a new
    boot starts from the top of its own output."""

    def __init__(self, vm: Machine) -> None:
        self.vm = vm

    def _expect(self, pattern: str, timeout: float = 120) -> str:
        start = self.vm.console_at
        self.vm.console_at = self.vm.serial.expect(pattern, start, timeout=timeout)
        return self.vm.serial.text()[start : self.vm.console_at]

    def page(self) -> str:
        """Open the Updates page from the main menu; return what it shows."""
        if self.vm.console_fresh:  # the first step of this boot: wait for the menu
            self.vm.console_at = self.vm.menu(self.vm.console_at)
            self.vm.console_fresh = False
        self.vm.serial.send("u")
        return self._expect(r"Choice: ")

    def back(self) -> None:
        """From the Updates page back to the main menu."""
        self.vm.serial.send("0")
        self._expect(r"Choice: ")

    def look(self) -> str:
        """What the Updates page shows now (opened and closed again)."""
        shown = self.page()
        self.back()
        return shown

    def set_field(self, number: int, value: str) -> None:
        """On the Updates page: change field ``number`` to ``value``."""
        self.vm.serial.send(str(number))
        self._expect(r"New [^\n]*\(Enter keeps [^\n]*\): ")
        self.vm.serial.send(value)
        said = self._expect(r"Choice: ")
        assert "Saved" in said, said

    def reboot(self) -> None:
        """On the Updates page: n (reboot into the version installed), confirmed with yes."""
        self.vm.serial.send("n")
        self._expect(r"Type yes to reboot: ")
        self.vm.serial.send("yes")
        self.vm.console_fresh = True  # the next step waits for the menu of the next boot

    def confirm(self, choice: str, timeout: float = 120) -> str:
        """On the Updates page: pick ``choice`` (i or c), type INSTALL; return the answer."""
        self.vm.serial.send(choice)
        asked = self._expect(r"(Type INSTALL to confirm: |Choice: )", timeout=timeout)
        assert asked.endswith("Type INSTALL to confirm: "), asked
        self.vm.serial.send("INSTALL")
        return asked + self._expect(r"Choice: ", timeout=timeout)


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    image = image_path()
    if not image.exists():
        pytest.skip(f"no image at {image}: build it with scripts/build-image (scripts/test-update does)")
    require_tools("mformat", "mcopy", "mmd", "mdir", "openssl")
    m = Machine(image, tmp_path_factory.mktemp("update-vm"))
    print(f"\n[update] booting {image} ({m.work})", flush=True)
    yield m
    if m.alive():
        m.kill()


@pytest.fixture(scope="module")
def state() -> dict[str, object]:
    """What the steps learned, for the later ones."""
    return {}


def running_version(vm: Machine, after: int = 0, timeout: float = 300) -> str:
    """The version the boot check names for this boot (journal, ttyS1)."""
    m = vm.wait_journal(r"update: version (\S+) is (healthy|not healthy)", timeout=timeout, after=after)
    return m.group(1)


#: The service password the test sets on N; it must survive the updates (appliance-service-password).
PASSWORD = "Service-2026"


def set_service_password(vm: Machine) -> None:
    """Answer the console's first-start question: set the service (root) password."""
    s = vm.serial
    at = s.expect(r"Set the service password now\? \[Y/n\]: ", vm.console_at, timeout=420)
    s.send("y")
    for prompt in (r"New password: ", r"Retype new password: "):
        at = s.expect(prompt, at)
        s.send(PASSWORD)
    at = s.expect(r"Service password set\.", at)
    vm.console_at = s.expect(r"Choice: ", at)
    vm.console_fresh = False


def test_boot_n_and_store(vm: Machine, tmp_path: Path, state: dict[str, object]) -> None:
    t = time.monotonic()
    vm.start()
    seconds = vm.wait_echo()
    n = running_version(vm)
    set_service_password(vm)
    series = ct_series(20, rows=64, cols=64)
    paths = write_series(series, tmp_path / "ct")
    done = subprocess.run(["storescu", "-aec", AET, "127.0.0.1", str(vm.ports[104]), *map(str, paths)],
                          check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    state["stored"] = {str(ds.SOPInstanceUID) for ds in series}
    state["n"] = n
    report("update", t, f"version {n} booted (C-ECHO after {seconds:.1f} s, boot check healthy); the service "
           f"password set at the console's first-start question; stored {len(paths)} CT slices")


def test_bad_signature_is_refused(vm: Machine, tmp_path: Path) -> None:
    t = time.monotonic()
    n1 = release_dir("APPLIANCE_RELEASE_N1")
    key = tmp_path / "stranger.pem"
    run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)])
    sig = tmp_path / "SHA256SUMS.sig"
    run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", str(key), "-in", str(n1 / "SHA256SUMS"), "-out", str(sig)])
    stick = make_stick(tmp_path / "stranger.img", {"SHA256SUMS": n1 / "SHA256SUMS", "SHA256SUMS.sig": sig})
    mark = len(vm.journal())
    vm.insert_stick(stick)
    m = vm.wait_journal(r"update (refused|offered|requested)[^\n]*", timeout=300, after=mark)
    assert m.group(1) == "refused", m.group(0)
    assert "export done" not in vm.journal()[mark:], "an update stick was exported to"
    vm.remove_stick()
    report("update", t, f"a stick signed by an unknown key: {m.group(0).strip()}")


def test_tampered_update_is_refused_before_writing(vm: Machine, tmp_path: Path) -> None:
    t = time.monotonic()
    n1 = release_dir("APPLIANCE_RELEASE_N1")
    files = release_files(n1)
    uki = next(name for name in files if name.endswith(".efi"))
    bad = tmp_path / uki
    shutil.copy(files[uki], bad)
    with bad.open("r+b") as f:  # one flipped bit in the middle of the UKI
        f.seek(bad.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    files[uki] = bad
    stick = make_stick(tmp_path / "tampered.img", files)
    console = Console(vm)
    mark = len(vm.journal())
    vm.insert_stick(stick)
    offered = vm.wait_journal(r"update (refused|offered|requested)[^\n]*", timeout=300, after=mark)
    assert offered.group(1) == "offered", offered.group(0)  # the signature is good; the bytes are not
    console.page()
    console.confirm("i")
    console.back()
    m = vm.wait_journal(r"update (done|failed): ([^\n]*)", timeout=600, after=mark)
    assert m.group(1) == "failed", m.group(0)
    journal = vm.journal()[mark:]
    assert not re.search(r"update: (emptying|writing)", journal), "the updater wrote before it had checked"
    vm.remove_stick()
    report("update", t, f"a stick with one flipped bit in {uki}: {m.group(0).strip()}")


def test_power_cut_while_writing_keeps_the_old_version(vm: Machine, tmp_path: Path, state: dict[str, object]) -> None:
    t = time.monotonic()
    n1 = release_dir("APPLIANCE_RELEASE_N1")
    stick = make_stick(tmp_path / "n1.img", release_files(n1))
    state["stick"] = stick
    console = Console(vm)
    mark = len(vm.journal())
    vm.insert_stick(stick)
    vm.wait_journal(r"update offered[^\n]*", timeout=300, after=mark)
    console.page()
    console.confirm("i")
    console.back()
    m = vm.wait_journal(r"update: writing version \S+ to slot \w: ([1-9]\d) %", timeout=900, after=mark)
    vm.kill()  # the power cut, in the middle of writing the other slot
    vm.start()
    seconds = vm.wait_echo()
    version = running_version(vm)
    assert version == state["n"], f"after the power cut the box runs {version}, not {state['n']}"
    report("update", t, f"power cut at {m.group(1)} % of writing {version_of(n1)}; the box booted {version} "
           f"again (C-ECHO after {seconds:.1f} s)")


def test_update_from_usb_stick(vm: Machine, state: dict[str, object]) -> None:
    t = time.monotonic()
    n1 = release_dir("APPLIANCE_RELEASE_N1")
    v1 = version_of(n1)
    console = Console(vm)
    mark = len(vm.journal())
    vm.insert_stick(state["stick"])  # type: ignore[arg-type]
    vm.wait_journal(r"update offered[^\n]*", timeout=300, after=mark)
    console.page()
    console.confirm("i")
    console.back()
    m = vm.wait_journal(r"update (done|failed): ([^\n]*)", timeout=1200, after=mark)
    assert m.group(1) == "done", m.group(0)
    installed = time.monotonic() - t
    vm.remove_stick()
    shown = console.page()
    assert f"Reboot now to start version {v1}" in shown, shown
    mark = len(vm.journal())
    console.reboot()  # the guest restarts; QEMU goes on
    healthy = vm.wait_journal(r"update: version (\S+) is (healthy and marked good|not healthy[^\n]*)", timeout=600,
                              after=mark)
    seconds = vm.wait_echo()
    vm.console_of_this_boot()
    boot_start = vm.console_at
    assert healthy.group(1) == v1 and healthy.group(2) == "healthy and marked good", healthy.group(0)
    shown = Console(vm).look()
    assert v1 in shown and str(state["n"]) in shown, shown
    assert "Set the service password now?" not in vm.serial.text()[boot_start:], \
        "the service password did not come along to the new version"
    report("update", t, f"{v1} from a USB stick: installed in {installed:.0f} s, rebooted from the console "
           f"(n on page u), booted and marked good (C-ECHO {seconds:.0f} s after QEMU's start); the service "
           "password came along")


def test_broken_update_from_http_rolls_back(vm: Machine, tmp_path: Path, state: dict[str, object]) -> None:
    t = time.monotonic()
    n2 = release_dir("APPLIANCE_RELEASE_N2")
    v1, v2 = version_of(release_dir("APPLIANCE_RELEASE_N1")), version_of(n2)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(n2))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://10.0.2.2:{server.server_address[1]}/"  # the host, seen from QEMU's user network
        console = Console(vm)
        console.page()
        console.set_field(1, url)
        console.set_field(3, str(TRIES))
        mark = len(vm.journal())
        answer = console.confirm("c", timeout=300)
        console.back()
        assert f"version {v2}" in answer, answer
        m = vm.wait_journal(r"update (done|failed): ([^\n]*)", timeout=1200, after=mark)
        assert m.group(1) == "done", m.group(0)
    finally:
        server.shutdown()
        server.server_close()
    state["url"] = url
    vm.powerdown()
    vm.start()
    # N+2 boots, its appliance fails, the boot check restarts the box; after TRIES such boots
    # systemd-boot starts N+1 again.
    at = 0
    for _ in range(TRIES):
        bad = vm.wait_journal(r"update: version (\S+) is not healthy", timeout=600, after=at)
        assert bad.group(1) == v2, bad.group(0)
        at = bad.end()
    seconds = vm.wait_echo()
    good = vm.wait_journal(r"update: version (\S+) is healthy", timeout=300, after=at)
    assert good.group(1) == v1, good.group(0)
    vm.console_of_this_boot()
    shown = Console(vm).look()
    assert "rolled back" in shown, shown
    report("update", t, f"{v2} (broken) from http: failed {TRIES} boots, the box rolled back to {v1} by itself "
           f"(C-ECHO {seconds:.0f} s after the first boot of {v2})")


def test_disk_after_the_updates(vm: Machine, tmp_path: Path, state: dict[str, object]) -> None:
    t = time.monotonic()
    v1 = version_of(release_dir("APPLIANCE_RELEASE_N1"))
    v2 = version_of(release_dir("APPLIANCE_RELEASE_N2"))
    vm.powerdown()
    raw = vm.disk_raw()
    try:
        names = gpt_names(raw)
        assert sorted(n for n in names if n.startswith("appliance_")) == sorted([f"appliance_{v1}", f"appliance_{v2}"]), names
        esp_start = gpt_partition(raw, "esp")[0]
        listing = run(["mdir", "-b", "-i", f"{raw}@@{esp_start * 512}", "::/EFI/Linux"])
        ukis = sorted(Path(line.strip()).name for line in listing.splitlines() if line.strip())
        assert f"appliance_{v1}.efi" in ukis, ukis
        assert any(re.fullmatch(rf"appliance_{re.escape(v2)}\+0-{TRIES}\.efi", u) for u in ukis), ukis
        view = StoreView(vm.data_partition(tmp_path / "data", raw=raw))
    finally:
        raw.unlink()
    view.check_consistent()
    stored = state["stored"]
    assert isinstance(stored, set)
    assert stored <= set(view.index), f"lost in the updates: {sorted(stored - set(view.index))[:5]}"
    config = (view.root / "config" / "appliance.toml").read_text()
    assert str(state["url"]) in config and f"boot_tries = {TRIES}" in config, config
    report("update", t, f"on the disk: slots {sorted(names)}, UKIs {ukis}; the {len(stored)} stored objects and "
           "the configuration intact, index = files")



def test_factory_reset_from_the_console(vm: Machine, tmp_path: Path, state: dict[str, object]) -> None:
    """Page u, r, with the service password set on version N (it came along to N+1): the box
    formats its data partition and restarts into the version it runs, with the defaults."""
    t = time.monotonic()
    v1 = version_of(release_dir("APPLIANCE_RELEASE_N1"))
    vm.start()
    s = vm.serial
    Console(vm).page()
    s.send("r")
    at = s.expect(r"Type ERASE to erase everything: ", vm.console_at)
    s.send("ERASE")
    at = s.expect(r"Service \(root\) password: ", at)
    mark = len(vm.journal())
    s.send(PASSWORD)
    s.expect(r"Factory reset done", at, timeout=300)
    healthy = vm.wait_journal(r"update: version (\S+) is healthy", timeout=600, after=mark)
    assert healthy.group(1) == v1, healthy.group(0)
    seconds = vm.wait_echo()
    vm.powerdown()
    view = StoreView(vm.data_partition(tmp_path / "data"))
    view.check_consistent()
    assert not view.index, f"{len(view.index)} objects survived the factory reset"
    config = view.root / "config" / "appliance.toml"
    assert not config.exists() or str(state.get("url", "")) not in config.read_text(), "the configuration survived"
    report("update", t, f"factory reset on the console (ERASE and the service password set on N): the box "
           f"restarted into "
           f"{v1} (C-ECHO {seconds:.0f} s after QEMU's start) with an empty store and the default configuration")
