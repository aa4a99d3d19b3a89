"""Double encryption with a customer key: a DES of type EncryptionAtRestWithPlatformAndCustomerKeys
against a real vault over HTTPS. Its disks get two layers with two independent DEKs (customer
AES-256-XTS wrapped by the vault key, infrastructure XChaCha20-Poly1305 wrapped by the platform
key store); each rotation acts on its own layer; the type is fixed; single <-> double is refused."""
import os

import pytest

from blockcrypt.control import des, disks
from blockcrypt.control.disks import open_volume
from blockcrypt.control.rotation import rotate_platform_key
from blockcrypt.errors import KeyDisabled, Refused, UsageError
from blockcrypt.format import ROLE_DATA, ROLE_INFRA

DOUBLE = "EncryptionAtRestWithPlatformAndCustomerKeys"


def stored(path, size, ss=4096):
    """The data area and the metadata area of a double disk (the file is sparse, 8 TiB+ long)."""
    from blockcrypt.format import layout
    with open(path, "rb") as f:
        f.seek(layout.DATA_OFFSET)
        data = f.read(size)
        f.seek(layout.META_AREA_OFFSET)
        return data + f.read(size // ss * layout.AEAD_META_BYTES)


@pytest.fixture
def ddes(state, vault, key_name):
    return des.create(state, "dd", f"{vault.url}/keys/{key_name}", vault_dir=str(vault.dir), grant=True,
                      enc_type=DOUBLE)


def test_double_des_disks_have_two_independent_layers(state, vault, ddes, key_name):
    assert ddes.type == DOUBLE
    assert des.to_json(state, ddes)["type"] == DOUBLE
    rec = des.create_disk(state, "vm", 4 << 20, "dd")
    assert rec.encryption_type == DOUBLE
    h = disks.read_disk_header(rec)
    data, infra = h.layer(ROLE_DATA), h.layer(ROLE_INFRA)
    assert (data.provider, data.data_alg, data.kek_id) == ("vault", "aes-xts-plain64", ddes.active_key)
    assert (infra.provider, infra.data_alg) == ("platform", "xchacha20-poly1305")
    layers = disks.open_layers(state, h)
    assert [l[0] for l in layers] == ["aes-xts-plain64", "xchacha20-poly1305"]
    assert len(layers[0][1]) == 64 and len(layers[1][1]) == 32 and layers[1][2] == h.disk_id
    assert layers[1][1] not in (layers[0][1][:32], layers[0][1][32:])
    del layers
    payload = os.urandom(1 << 20)
    with open_volume(state, "vm") as v:
        v.write(12345, payload)
    with open_volume(state, "vm") as v:
        assert v.read(12345, len(payload)) == payload


def test_each_rotation_rewraps_its_own_layer_without_rewriting_data(state, vault, ddes, key_name):
    rec = des.create_disk(state, "vm", 2 << 20, "dd")
    payload = os.urandom(2 << 20)
    with open_volume(state, "vm") as v:
        v.write(0, payload)
    h0 = disks.read_disk_header(rec)
    blob = stored(rec.path, 2 << 20)
    new_kid = vault.key("rotate", key_name)["key"]["kid"]
    r = des.update(state, "dd", key_url=new_kid)
    assert r["rewrapped"] == ["vm"]
    h1 = disks.read_disk_header(rec)
    assert h1.layer(ROLE_DATA).kek_id == new_kid != h0.layer(ROLE_DATA).kek_id
    assert h1.layer(ROLE_INFRA) == h0.layer(ROLE_INFRA)  # the platform layer is not the DES's
    p = rotate_platform_key(state)
    h2 = disks.read_disk_header(rec)
    assert h2.layer(ROLE_INFRA).kek_id == f"platform/{p['version']}" != h1.layer(ROLE_INFRA).kek_id
    assert h2.layer(ROLE_DATA) == h1.layer(ROLE_DATA)  # the customer layer is not the platform's
    assert stored(rec.path, 2 << 20) == blob  # no data (or metadata) rewritten
    with open_volume(state, "vm") as v:
        assert v.read(0, 2 << 20) == payload


def test_customer_key_disabled_stops_the_double_disk(state, vault, ddes, key_name):
    des.create_disk(state, "vm", 1 << 20, "dd")
    with open_volume(state, "vm") as v:
        v.write(0, b"a" * 4096)
    vault.key("disable", key_name)
    with pytest.raises(KeyDisabled):
        open_volume(state, "vm")
    vault.key("enable", key_name)
    with open_volume(state, "vm") as v:
        assert v.read(0, 4096) == b"a" * 4096


def test_single_double_moves_are_refused_naming_disk_copy(state, vault, ddes, key_name, des_rec):
    disks.create(state, "plain", 1 << 20)
    with pytest.raises(Refused, match="disk copy") as e:
        des.move_disk_to_des(state, "plain", "dd")  # single -> double DES
    assert "\n" not in str(e.value)
    disks.create(state, "pp", 1 << 20, double=True)
    with pytest.raises(Refused, match="disk copy"):
        des.move_disk_to_des(state, "pp", "des1")  # double -> single-layer DES
    moved = des.move_disk_to_des(state, "pp", "dd")  # double -> double: a re-wrap of the data layer
    assert moved.encryption_type == DOUBLE
    with pytest.raises(Refused, match="fixed at creation"):
        des.refuse_type_change("dd")
    with pytest.raises(UsageError):
        des.create(state, "bad", f"{vault.url}/keys/{key_name}", vault_dir=str(vault.dir), grant=True,
                   enc_type="EncryptionAtRestWithPlatformKey")


def test_disk_copy_moves_between_single_and_double(state, vault, ddes, key_name, des_rec):
    """What a re-wrap cannot do, a copy does: into a DES of the other type, or (platform keys)
    with --double-encryption / --single-encryption; a flag that contradicts the DES is refused."""
    from blockcrypt.control.copy import copy
    payload = os.urandom(300_000)
    disks.create(state, "plain", 1 << 20)
    with open_volume(state, "plain") as v:
        v.write(4096 * 3 + 7, payload)

    def content(name):
        with open_volume(state, name, read_only=True) as v:
            return v.read(4096 * 3 + 7, len(payload))

    def double(name):
        return disks.is_double(disks.read_disk_header(state.catalog.get_disk(name)))

    copy(state, "plain", "to-dd", des="dd")                       # single -> double, customer key
    assert double("to-dd") and state.catalog.get_disk("to-dd").encryption_type == DOUBLE
    copy(state, "plain", "pp", double=True)                        # single -> double, platform keys
    assert double("pp") and state.catalog.get_disk("pp").des is None
    copy(state, "pp", "pp2")                                       # double stays double by default
    copy(state, "to-dd", "back", des="", double=False)             # customer double -> platform single
    assert double("pp2") and not double("back") and state.catalog.get_disk("back").des is None
    for name in ("to-dd", "pp", "pp2", "back"):
        assert content(name) == payload, name
    with pytest.raises(Refused, match="of type") as e:
        copy(state, "plain", "nope", des="dd", double=False)
    assert "\n" not in str(e.value) and state.catalog.find_disk("nope") is None
    with pytest.raises(Refused, match="single-encryption"):
        des.move_disk_to_des(state, "pp", "des1")
