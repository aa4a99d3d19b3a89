"""A rotation in a child process, SIGKILLed at a named step (tests of crash safety).

The child runs ``rotate_platform_key`` (``what="platform"``) or ``des.rotate(NAME, KID)``
(``what="des:NAME:KID"``) with REWRAP_BATCH = ``batch`` and prints a mark at every step:
``rewrap-<disk>`` before a disk's re-wrap, ``write-<i>`` before batch i's headers are
written, ``synced-A-<i>`` / ``synced-B-<i>`` once batch i's copy A / copy B sync pass is
done. At the mark named ``target`` it stops; the parent kills it there with SIGKILL."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import sys, time
    from blockcrypt.control import des, rotation
    from blockcrypt.control.state import State

    state_path, target, batch, what = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    rotation.REWRAP_BATCH = batch
    n = {"sync": 0, "write": 0}

    def mark(tag):
        print(tag, flush=True)
        if tag == target:
            time.sleep(120)   # the parent kills us here

    real = rotation._sync_pass

    def sync(bs, pool=None):
        real(bs, pool)
        n["sync"] += 1
        i, phase = divmod(n["sync"] - 1, 2)
        mark(f"synced-{'AB'[phase]}-{i}")
    rotation._sync_pass = sync

    def on_step(step, detail):
        if step == "rewrap":
            mark(f"rewrap-{detail}")
        elif step == "write":
            mark(f"write-{n['write']}")
            n["write"] += 1
    st = State.open(state_path)
    if what == "platform":
        rotation.rotate_platform_key(st, on_step=on_step)
    else:
        _, name, kid = what.split(":", 2)
        des.rotate(st, name, kid, on_step=on_step)
    print("done", flush=True)
""")


def rotate_and_kill(tmp_path: Path, state_path: Path, target: str, batch: int, what: str = "platform") -> None:
    """Run the child until it prints ``target``, then SIGKILL it (asserts it got there)."""
    script = tmp_path / "rotate-child.py"
    script.write_text(CHILD)
    p = subprocess.Popen([sys.executable, str(script), str(state_path), target, str(batch), what], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in p.stdout:
            seen.append(line.strip())
            if seen[-1] == target:
                break
        assert seen and seen[-1] == target, (seen[-5:], p.stderr.read() if p.poll() is not None else "")
        p.send_signal(signal.SIGKILL)
    finally:
        p.kill()
        p.wait(30)
        p.stdout.close()
        p.stderr.close()


def disks_done(target: str, batch: int) -> int:
    """How many disks (in rotation order) have their new header once the child is killed at
    ``target``: the batches before the one killed, and that one too once its pass A is durable."""
    if target.startswith("rewrap-"):
        raise ValueError("give the batch of a rewrap mark yourself")
    i = int(target.rsplit("-", 1)[1])
    return batch * (i + (1 if target.startswith("synced-") else 0))
