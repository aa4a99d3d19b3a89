"""Moving a customer-key disk to another host (docs/OPERATIONS.md, "Backup, restore and moving
hosts"): the key stays in the vault (HTTPS on 127.0.0.1); host B gets a DES on the same key URL
with an identity of its own, the disk file, and `catalog rebuild`. No platform key moves."""
import subprocess

from blockcrypt.control.disks import open_volume
from blockcrypt.control.state import State

from support.clihelpers import bc, bcj

MiB = 1 << 20


def test_move_a_customer_key_disk_to_another_host(tmp_path, vault, key_name):
    a, b = tmp_path / "hostA", tmp_path / "hostB"
    url = f"{vault.url}/keys/{key_name}"
    bc(a, "init")
    bc(a, "des", "create", "des1", "--key-url", url, "--vault-dir", vault.dir, "--grant")
    bc(a, "disk", "create", "vm", "--size", "8M", "--des", "des1")
    vol = open_volume(State.open(a), "vm")
    try:
        vol.write(5 * MiB + 3, b"customer-key-data-from-host-a")
        vol.flush()
    finally:
        vol.close()
    # host B: its own state directory and a DES on the same vault key (an identity of its own)
    bc(b, "init")
    bc(b, "des", "create", "des1", "--key-url", url, "--vault-dir", vault.dir, "--grant")
    (disk_file,) = list((a / "disks").glob("*.img"))
    subprocess.run(["cp", "--sparse=always", str(disk_file), str(b / "disks")], check=True)
    rb = bcj(b, "catalog", "rebuild")
    assert rb["disks"] == ["vm"]
    show = bcj(b, "disk", "show", "vm")
    assert show["health"] == "Healthy", show
    assert show["encryption"]["type"] == "EncryptionAtRestWithCustomerKey"
    assert show["encryption"]["diskEncryptionSetName"] == "des1"
    vol = open_volume(State.open(b), "vm", read_only=True)
    try:
        assert vol.read(5 * MiB + 3, 29) == b"customer-key-data-from-host-a"
    finally:
        vol.close()
    # host B's platform keys were never involved: its store is still its own single version
    assert [v["version"] for v in bcj(b, "platform-key", "list")] == [1]
