"""bench/xts_speed.py --engine-aead for real: the engine's AEAD layer (build/native/test_aead
--speed) and `openssl speed -evp chacha20-poly1305` give positive, parsed figures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / "build" / "native" / "test_aead"


@pytest.fixture(scope="module")
def test_aead_binary():
    subprocess.run(["make", "-s", "-C", str(ROOT / "native"), "../build/native/test_aead"], check=True)
    assert os.access(BINARY, os.X_OK)
    return BINARY


def test_engine_aead_against_openssl(test_aead_binary):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "xts_speed.py"), "--engine-aead", "--runs", "1",
                          "--openssl-seconds", "1", "--native-seconds", "0.05", "--json"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    r = json.loads(out)
    assert r["bulk"] in {"avx512", "openssl", "gcrypt"}
    for k in ("layer_seal_4k", "layer_open_4k", "layer_seal_1m", "layer_open_1m",
              "openssl_seal_bulk", "openssl_seal_aead", "openssl_open_aead"):
        assert r["medians"][k] > 0.05, k   # GB/s: far above zero on any CPU with the layer working
    assert set(r["ratios"]) == {"seal_4k_vs_bulk", "seal_4k_vs_aead", "open_4k_vs_aead", "seal_1m_vs_aead",
                                "inproc_seal_4k_vs_openssl", "inproc_open_4k_vs_openssl",
                                "inproc_seal_4k_vs_sodium"}
    assert r["ratios"]["seal_4k_vs_aead"] == pytest.approx(
        r["medians"]["layer_seal_4k"] / r["medians"]["openssl_seal_aead"])


def test_speed_mode_honours_the_bulk_override(test_aead_binary):
    """BLOCKCRYPT_AEAD_BULK picks the library (gcrypt and openssl run on any x86-64 CPU)."""
    for bulk in ("gcrypt", "openssl"):
        p = subprocess.run([str(test_aead_binary), "--speed", "0.01"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "BLOCKCRYPT_AEAD_BULK": bulk})
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["bulk"] == bulk


def test_speed_mode_prints_positive_figures(test_aead_binary):
    """test_aead --speed: one JSON line, seal and open at 1 and 256 sectors per call, openssl's
    bulk loop and libsodium's seal beside them, and per-round ratios (it prints -1 and exits
    non-zero when a seal or open fails)."""
    p = subprocess.run([str(test_aead_binary), "--speed", "0.02"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    figures = json.loads(p.stdout)
    # the library the layer ran its ChaCha20-Poly1305 through, chosen by the CPU
    assert figures.pop("bulk") in {"avx512", "openssl", "gcrypt"}
    assert set(figures) == {"seal_4k", "open_4k", "seal_1m", "open_1m", "openssl_bulk_4k", "sodium_seal_4k",
                            "seal_4k_vs_openssl", "open_4k_vs_openssl", "seal_4k_vs_sodium"}
    assert all(v > 0 for v in figures.values())
    # a ratio is a median of per-round ratios, not the ratio of medians, but it cannot be
    # further from that than the spread of the rounds: an order of magnitude is a wrong key
    assert 0.1 < figures["seal_4k_vs_openssl"] / (figures["seal_4k"] / figures["openssl_bulk_4k"]) < 10
