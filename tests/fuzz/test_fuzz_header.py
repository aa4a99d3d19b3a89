"""Fuzzing the header parser (issue 15): every mutation of a header copy gives a valid header
or a clean error (CorruptHeader / UnsupportedFormat from read_header), never another exception
and never a hang. Mutations re-seal the checksum half of the time, so the parser behind it is
reached. Bounded for `make test` (BLOCKCRYPT_FUZZ_SECONDS, default 8); `make fuzz` runs long."""
import hashlib
import os
import random
import struct
import time

from blockcrypt.errors import CorruptHeader, UnsupportedFormat
from blockcrypt.format import Header, layout, read_header
from blockcrypt.format.header import MAGIC_A, MAGIC_B, pack

SECONDS = float(os.environ.get("BLOCKCRYPT_FUZZ_SECONDS", "8"))


class MemBacking:
    def __init__(self, data: bytearray):
        self.data = data
        self.location, self.writable = "mem", True

    def read_at(self, off, length):
        chunk = bytes(self.data[off:off + length])
        return chunk + bytes(length - len(chunk))

    def write_at(self, off, data):
        end = off + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[off:end] = data

    def flush(self):
        pass


def _seed_headers():
    from blockcrypt.format import Layer
    lay = Layer(1, "platform", "platform/1", "A256GCM", "aes-xts-plain64", os.urandom(92), os.urandom(32))
    return [Header(disk_id=os.urandom(16), name="vm1", size=1 << 30, sector_size=4096,
                   cipher="aes-xts-plain64", kind="disk", read_only=False, layers=(lay,))]


def _mutate(rng, raw: bytes) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(7)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2:
            b = b[:rng.randrange(len(b) + 1)]
        elif op == 3:
            i = rng.randrange(len(b) + 1)
            b[i:i] = os.urandom(rng.randint(1, 64))
        elif op == 4 and len(b) > 4:  # an interesting integer somewhere
            i = rng.randrange(len(b) - 4)
            b[i:i + 4] = struct.pack("<I", rng.choice((0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 4096, 65536)))
        elif op == 5 and len(b) > 8:  # a length field near the strings
            i = rng.randrange(64, max(65, len(b) - 2))
            b[i:i + 2] = struct.pack("<H", rng.randrange(65536))
        elif op == 6:
            b = b[:16] + os.urandom(rng.randrange(256)) + b[16:]
    if rng.random() < 0.5 and len(b) >= 36:  # re-seal: reach the parser behind the checksum
        total = int.from_bytes(b[12:16], "little") if len(b) > 16 else len(b)
        total = total if 36 <= total <= len(b) else len(b)
        b[total - 32:total] = hashlib.sha256(bytes(b[:total - 32])).digest()
    return bytes(b[:layout.COPY_MAX])


def test_header_parser_survives_mutations():
    rng = random.Random(int(os.environ.get("BLOCKCRYPT_FUZZ_SEED", "15")))
    seeds = [pack(h, MAGIC_A) for h in _seed_headers()]
    deadline = time.monotonic() + SECONDS
    n = ok = 0
    while time.monotonic() < deadline:
        raw = _mutate(rng, rng.choice(seeds))
        data = bytearray(layout.COPY_B_OFF + layout.COPY_MAX)
        data[0:len(raw)] = raw
        other = _mutate(rng, rng.choice(seeds)).replace(MAGIC_A, MAGIC_B, 1)
        data[layout.COPY_B_OFF:layout.COPY_B_OFF + len(other)] = other
        t0 = time.monotonic()
        try:
            h = read_header(MemBacking(data), "fuzz", repair=rng.random() < 0.3)
            assert isinstance(h, Header)
            ok += 1
        except (CorruptHeader, UnsupportedFormat):
            pass
        assert time.monotonic() - t0 < 1.0, "a header parse took over a second"
        n += 1
    assert n > 500, n
