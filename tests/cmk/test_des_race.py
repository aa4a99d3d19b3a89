"""Issue 15, M9: `disk create --des` racing `des rotate` never leaves the new disk on the old
key version while the DES reports the rotation done (real vault over HTTPS)."""
import threading

from blockcrypt.control import des, disks
from blockcrypt.format import ROLE_DATA


def test_disk_created_during_a_rotation_ends_on_the_new_version(state, vault, key_name, des_rec):
    disks_before = des.create_disk(state, "d0", 1 << 20, "des1")
    new_kid = vault.key("rotate", key_name)["key"]["kid"]
    paused, go = threading.Event(), threading.Event()
    result = {}

    def on_step(step, detail):
        if step == "wrap":   # create_disk read the DES's active key: hold it there
            result["read_key"] = detail
            paused.set()
            go.wait(5)
    creator = threading.Thread(target=lambda: result.setdefault(
        "disk", des.create_disk(state, "racer", 1 << 20, "des1", on_step=on_step)))
    creator.start()
    assert paused.wait(10)
    rotator = threading.Thread(target=lambda: result.setdefault("rot", des.rotate(state, "des1")))
    rotator.start()
    rotator.join(1.0)   # without the DES lock the rotation finishes here, before the disk exists
    go.set()
    creator.join(10)
    rotator.join(30)
    assert result["rot"]["activeKey"] == new_kid
    for name in ("d0", "racer"):
        h = disks.read_disk_header(state.catalog.get_disk(name))
        assert h.layer(ROLE_DATA).kek_id == new_kid, (name, h.layer(ROLE_DATA).kek_id)
    assert disks_before.name == "d0"
