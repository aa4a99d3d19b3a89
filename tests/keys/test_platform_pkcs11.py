"""Platform keys in a PKCS#11 token (SoftHSM2): `init --platform-keys pkcs11:...`, disks on it over a
real mount, `platform-key rotate` (a new key object, every DEK re-wrapped, the old object destroyed),
and the refusals: a PIN in the URI, a PIN file others can read, a wrong PIN."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from blockcrypt.control.state import State
from blockcrypt.keys.providers.pkcs11 import Pkcs11Keys, parse_uri
from support.fusehelpers import CLI, Mount
from support.treefixtures import root  # noqa: F401  (fixture)

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is absent")


def cli(path, *args, check=True):
    p = subprocess.run([*CLI, "--state", str(path), *map(str, args)], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"blockcrypt {' '.join(map(str, args))} failed ({p.returncode}): {p.stderr}")
    return p


@pytest.fixture
def token_uri(tmp_path, softhsm_env, request):
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    obj = "pk-" + request.node.name[-20:].replace("[", "").replace("]", "")
    return f"pkcs11:token=plat;object={obj}?module-path={SOFTHSM_MODULE}&pin-source=file:{pin}", pin


def test_platform_keys_in_a_token(root, token_uri):
    uri, _pin = token_uri
    path = root / "state"
    out = json.loads(cli(path, "init", "--platform-keys", uri, "--json").stdout)
    assert out["platformKeyBackend"] == "pkcs11"
    doc = json.loads((path / "keys" / "platform.json").read_text())
    assert doc["backend"] == "pkcs11" and all("key" not in v for v in doc["versions"])
    keys = Pkcs11Keys(parse_uri(uri))
    assert keys.versions() == [1]
    cli(path, "disk", "create", "d1", "--size", "16M")
    cli(path, "disk", "create", "d2", "--size", "16M")
    st = State.open(path)
    mp = root / "mnt"
    mp.mkdir()
    data = os.urandom(1 << 20)
    m = Mount(st, mp).start()
    try:
        with open(m.disk("d1"), "r+b") as f:
            f.write(data)
        r = json.loads(cli(path, "platform-key", "rotate", "--json").stdout)
        assert r["version"] == 2 and sorted(r["rewrapped"]) == ["d1", "d2"] and r["retired"] == [1]
        assert keys.versions() == [2], "the retired version's key object is destroyed"
        m.restart()
        with open(m.disk("d1"), "rb") as f:
            assert f.read(len(data)) == data
        with open(m.disk("d2"), "rb") as f:
            assert f.read(4096) == bytes(4096)
    finally:
        m.stop()
    listed = json.loads(cli(path, "platform-key", "list", "--json").stdout)
    assert [v["version"] for v in listed] == [2]
    # the key never left the token: nothing in the state directory holds it (it is not extractable)
    from pkcs11 import Attribute
    with keys.session() as s:
        k = keys._key(s, 2)
        assert not k[Attribute.EXTRACTABLE] and k[Attribute.SENSITIVE]


def test_refusals(tmp_path, token_uri):
    uri, pin = token_uri
    p = cli(tmp_path / "s1", "init", "--platform-keys", uri.replace("pin-source=file:" + str(pin), "pin-value=1234"),
            check=False)
    assert p.returncode != 0 and "PIN in the PKCS#11 URI is refused" in p.stderr and "1234" not in p.stderr
    pin.chmod(0o644)
    p = cli(tmp_path / "s2", "init", "--platform-keys", uri, check=False)
    assert p.returncode != 0 and "must be mode 0600" in p.stderr
    pin.chmod(0o600)
    pin.write_text("9999\n")
    p = cli(tmp_path / "s3", "init", "--platform-keys", uri, check=False)
    assert p.returncode != 0 and "refused the PIN" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    env_uri = uri.replace("pin-source=file:" + str(pin), "pin-source=env:BC_TEST_PIN")
    p = subprocess.run([*CLI, "--state", str(tmp_path / "s4"), "init", "--platform-keys", env_uri],
                       capture_output=True, text=True, env={**os.environ, "BC_TEST_PIN": "1234"})
    assert p.returncode == 0, p.stderr
