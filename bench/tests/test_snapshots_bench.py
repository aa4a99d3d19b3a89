"""bench/snapshots.py on a small disk: every create time measured, each new file a header only."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import snapshots as snapbench  # noqa: E402

from blockcrypt.control.state import State  # noqa: E402


def test_create_times_small(tmp_path):
    st = State.init(tmp_path / "state")
    r = snapbench.create_times(st, 1 << 30, 128 << 20, 2)
    for k in ("snapshotCreate", "imageFromSnapshot", "diskFromImage", "imageFromDisk"):
        assert 0 < r[k]["medianS"] <= r[k]["maxS"]
    assert all(v < 1 << 20 for v in r["newFileBytes"].values()), r["newFileBytes"]
    assert r["frozenFileBytes"] >= 128 << 20
