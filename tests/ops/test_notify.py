"""systemd readiness for real (issue 16): the mount daemon, started as the unit starts it
(`blockcrypt mount --foreground`) with $NOTIFY_SOCKET naming a datagram socket this test
binds, sends READY=1 only once the mount answers, and STOPPING=1 when it unmounts; the
vault sends READY=1 once it listens. Under $JOURNAL_STREAM the daemon logs to stderr with
syslog priorities and writes no log file."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from blockcrypt.control import disks
from blockcrypt.mount import daemon as bmount
from support.fusehelpers import CLI, cleanup_tree
from support.vaultproc import PY, REPO, make_vault

MiB = 1 << 20


def _bind(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(0.05)
    return s


def _messages(sock, until, timeout_s, also=None):
    """Datagrams received until ``until(text)`` holds for one (returns them all so far)."""
    got = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            text = sock.recv(4096).decode()
        except socket.timeout:
            if also is not None:
                also()
            continue
        got.append((text, also() if also is not None else None))
        if until(text):
            return got
    raise AssertionError(f"no matching notification within {timeout_s} s; got {got}")


@pytest.mark.parametrize("frontend", ["native", "fusepy"])
def test_mount_ready_only_once_serving_and_stopping_at_unmount(root, state, frontend):
    disks.create(state, "d", 8 * MiB)
    mp = root / "mnt"
    mp.mkdir()
    sock_path = root / "notify.sock"
    sock = _bind(sock_path)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "BLOCKCRYPT_FRONTEND": frontend}
    p = subprocess.Popen([*CLI, "--state", str(state.path), "mount", "--foreground", str(mp)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def serving():
            return bmount.FSTYPE in bmount.mounts_at(str(mp))

        got = _messages(sock, lambda t: "READY=1" in t, 30, also=serving)
        ready_text, _ = got[-1]
        # the first datagram is READY=1 (nothing before it), and at that moment the mount answers:
        assert len(got) == 1 and ready_text.splitlines()[0] == "READY=1", got
        assert any(line.startswith("STATUS=serving ") for line in ready_text.splitlines())
        assert got[-1][1] is True  # mounted when READY=1 arrived
        assert "disks" in os.listdir(mp)
        assert os.listdir(mp / "disks") == ["d"]
        with open(mp / "disks" / "d", "r+b") as f:
            f.write(b"ready means ready")
        r = subprocess.run([*CLI, "--state", str(state.path), "umount", str(mp)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        got = _messages(sock, lambda t: "STOPPING=1" in t, 20)
        assert got[-1][0].splitlines()[0] == "STOPPING=1"
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert not bmount.mounts_at(str(mp))
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        sock.close()
        cleanup_tree(root, state)


def test_sigterm_as_systemctl_stop_sends_stopping(root, state):
    mp = root / "mnt"
    mp.mkdir()
    sock_path = root / "notify.sock"
    sock = _bind(sock_path)
    p = subprocess.Popen([*CLI, "--state", str(state.path), "mount", "--foreground", str(mp)],
                         env={**os.environ, "NOTIFY_SOCKET": str(sock_path)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _messages(sock, lambda t: "READY=1" in t, 30)
        p.send_signal(signal.SIGTERM)
        _messages(sock, lambda t: "STOPPING=1" in t, 20)
        p.communicate(timeout=30)
        assert p.returncode == 0
        assert not bmount.mounts_at(str(mp))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        sock.close()
        cleanup_tree(root, state)


def test_journal_stream_logs_to_stderr_only(root, state):
    mp = root / "mnt"
    mp.mkdir()
    errf = open(root / "journal.txt", "w+b")
    st = os.fstat(errf.fileno())
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    p = subprocess.Popen([*CLI, "--state", str(state.path), "mount", "--foreground", str(mp)], env=env,
                         stdout=subprocess.DEVNULL, stderr=errf)
    try:
        deadline = time.monotonic() + 30
        while b"mounted at" not in (root / "journal.txt").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        p.wait(30)
        text = (root / "journal.txt").read_text()
        lines = [l for l in text.splitlines() if l.startswith("<")]
        assert any(l.startswith("<6>blockcrypt.mount: mounted at ") for l in lines), text
        assert not (state.path / "logs" / "mount.log").exists()   # the journal has it all
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        errf.close()
        cleanup_tree(root, state)


def test_vault_ready_and_stopping(tmp_path):
    vdir = make_vault(tmp_path / "vault")
    sock_path = tmp_path / "notify.sock"
    sock = _bind(sock_path)
    p = subprocess.Popen([PY, "-m", "blockcrypt", "vault", "serve", "--dir", str(vdir), "--listen", "127.0.0.1:0"],
                         cwd=REPO, env={**os.environ, "NOTIFY_SOCKET": str(sock_path)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        got = _messages(sock, lambda t: "READY=1" in t, 30)
        url = [l for l in got[-1][0].splitlines() if l.startswith("STATUS=serving ")][0].split()[-1]
        host, port = url.removeprefix("https://").rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=5).close()  # it listens when it says so
        p.send_signal(signal.SIGTERM)
        _messages(sock, lambda t: "STOPPING=1" in t, 20)
        p.wait(20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        sock.close()
