"""Temp disks without a kernel: NAME:SIZE specs, the mount-time settings, the options over the
settings, and the temp source's files (leftovers deleted, sparse files made, all removed at
the end; an encrypted one's file never holds what was written)."""
from __future__ import annotations

import os

import pytest

from blockcrypt.control import settings
from blockcrypt.control.tempdisks import TempDiskSpec, parse_on_off, parse_spec, parse_specs
from blockcrypt.errors import BadSize, MountError, UsageError
from blockcrypt.mount.temp_source import TempConfig, TempSource

MiB = 1 << 20


@pytest.mark.parametrize("text,want", [("scratch:10G", TempDiskSpec("scratch", 10 << 30)),
                                       (" s-1:4K ", TempDiskSpec("s-1", 4096)),
                                       ("a.b:12288", TempDiskSpec("a.b", 12288))])
def test_specs_parse(text, want):
    assert parse_spec(text) == want


@pytest.mark.parametrize("text,err,words", [
    ("scratch", UsageError, "use NAME:SIZE"), (":1G", UsageError, "use NAME:SIZE"),
    ("a:", UsageError, "use NAME:SIZE"), ("-x:1G", UsageError, "invalid temp disk name"),
    ("a:1000", BadSize, "4096-byte sectors"), ("a:lots", BadSize, "not a size"), ("a:0", BadSize, "greater than zero")])
def test_bad_specs_say_what_is_wrong_in_one_line(text, err, words):
    with pytest.raises(err) as e:
        parse_spec(text)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_name_given_twice_is_refused():
    with pytest.raises(UsageError, match="given twice"):
        parse_specs(["a:1M", "a:2M"])
    assert parse_specs("a:1M, b:2M,") == [TempDiskSpec("a", MiB), TempDiskSpec("b", 2 * MiB)]


def test_on_off_words():
    assert [parse_on_off(w) for w in ("true", "ON", "yes", "1", "false", "off", "no", "0", "")] == [True] * 4 + [False] * 5
    with pytest.raises(ValueError):
        parse_on_off("maybe")


def test_settings_are_validated_canonical_and_marked_mount_time(state):
    assert settings.get(state, "encryption_at_host") is False
    assert settings.set_(state, "encryption_at_host", "ON") == "true"
    assert settings.get(state, "encryption_at_host") is True
    assert settings.set_(state, "temp_disks", "scratch:1024M, swap:4K") == "scratch:1G,swap:4K"
    with pytest.raises(UsageError, match="invalid value 'x:1G,y:foo' for temp_disks"):
        settings.set_(state, "temp_disks", "x:1G,y:foo")
    assert settings.get_text(state, "temp_disks") == "scratch:1G,swap:4K"  # the bad value lost nothing
    with pytest.raises(UsageError, match="an absolute path"):
        settings.set_(state, "temp_dir", "relative/dir")
    with pytest.raises(UsageError, match="true or false"):
        settings.set_(state, "encryption_at_host", "perhaps")
    assert {n for n, s in settings.SETTINGS.items() if s.mount_time} == {"encryption_at_host", "temp_disks",
                                                                          "temp_dir",  # issue 16:
                                                                          "metrics_listen", "log_max_bytes",
                                                                          "log_files", "xattrs"}


def test_options_override_the_settings(state, tmp_path):
    c = TempConfig.resolve(state)
    assert c == TempConfig((), str(state.path / "temp"), False)
    settings.set_(state, "temp_disks", "a:1M")
    settings.set_(state, "encryption_at_host", "true")
    settings.set_(state, "temp_dir", str(tmp_path / "t"))
    assert TempConfig.resolve(state) == TempConfig((TempDiskSpec("a", MiB),), str(tmp_path / "t"), True)
    c = TempConfig.resolve(state, ["b:2M", "c:4K"], str(tmp_path / "u"), False)
    assert c == TempConfig((TempDiskSpec("b", 2 * MiB), TempDiskSpec("c", 4096)), str(tmp_path / "u"), False)
    assert c.argv() == ["--temp-dir", str(tmp_path / "u"), "--temp-disk", f"b:{2 * MiB}", "--temp-disk", "c:4096"]


def _source(tmp_path, eah, *specs):
    return TempSource(TempConfig(tuple(parse_specs(specs)), str(tmp_path / "temp"), eah))


@pytest.mark.parametrize("eah", [False, True], ids=["plain", "encryption-at-host"])
def test_source_life_leftovers_sparse_files_and_removal(tmp_path, eah):
    (tmp_path / "temp").mkdir()
    left = tmp_path / "temp" / "old.tmpdisk"
    left.write_bytes(b"left by a dead mount")
    other = tmp_path / "temp" / "notes.txt"
    other.write_text("not ours")
    src = _source(tmp_path, eah, "a:16M", "b:4K")
    src.prepare()
    assert not left.exists() and other.exists() and src.removed_leftovers == ["old.tmpdisk"]
    pa = src.path("a")
    assert pa.stat().st_size == 16 * MiB and pa.stat().st_blocks == 0 and oct(pa.stat().st_mode & 0o777) == "0o600"
    assert set(src.entries()) == {"a", "b"} and src.entries()["a"].size == 16 * MiB and not src.watched
    marker = b"TEMP-SOURCE-MARKER-" + os.urandom(6).hex().encode()
    v = src.open("a")
    v.write(8192 + 10, marker)
    v.flush()
    v.close()                      # a front end's last release: the volume (and key) live on
    assert src.open("a") is v
    assert v.read(8192 + 10, len(marker)) == marker
    assert (marker in pa.read_bytes()) is (not eah)
    assert [t["encrypted"] for t in src.status()] == [eah, eah]
    src.shutdown()
    assert not pa.exists() and not src.path("b").exists() and other.exists()
    with pytest.raises(ValueError):
        v.read(0, 1)               # destroyed: the engine dropped the volume and its key


def test_a_temp_dir_that_cannot_be_made_is_a_one_line_mount_error(tmp_path):
    (tmp_path / "file").write_text("x")
    src = TempSource(TempConfig(tuple(parse_specs(["a:1M"])), str(tmp_path / "file" / "temp"), True))
    with pytest.raises(MountError, match="cannot prepare the temp disks in"):
        src.prepare()
