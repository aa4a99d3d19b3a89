"""Build the native cores: blockcrypt._xts (AES-256-XTS over OpenSSL libcrypto),
blockcrypt._aead (XChaCha20-Poly1305 per sector over libsodium, the platform layer of
double encryption) and blockcrypt._engine (the C data plane: the volume engine in
native/engine/ and, when present, the libfuse 3 session in native/session/).

BLOCKCRYPT_ENGINE_CFLAGS / BLOCKCRYPT_ENGINE_LDFLAGS add flags to blockcrypt._engine only
(the sanitizer build in tests/engine uses them)."""
import glob
import os
import shlex
import subprocess

from setuptools import Extension, setup


def _pkg_config(pkg):
    """(include_dirs, library_dirs, libraries, other compile flags) of a pkg-config package."""
    try:
        out = subprocess.run(["pkg-config", "--cflags", "--libs", pkg], check=True, capture_output=True,
                             text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ["/usr/include/fuse3"], [], ["fuse3"], []  # Debian's layout, if pkg-config is missing
    inc, libdirs, libs, other = [], [], [], []
    for tok in shlex.split(out):
        if tok.startswith("-I"):
            inc.append(tok[2:])
        elif tok.startswith("-L"):
            libdirs.append(tok[2:])
        elif tok.startswith("-l"):
            libs.append(tok[2:])
        elif tok != "-pthread":
            other.append(tok)
    return inc, libdirs, libs, other


def _engine_extension():
    sources = ["native/py_engine.c"] + sorted(glob.glob("native/engine/*.c"))
    # the session engineer's files join automatically once they exist
    if os.path.exists("native/py_session.c"):
        sources += ["native/py_session.c"] + sorted(glob.glob("native/session/*.c"))
    fuse_inc, fuse_libdirs, fuse_libs, fuse_other = _pkg_config("fuse3")
    extra_c = shlex.split(os.environ.get("BLOCKCRYPT_ENGINE_CFLAGS", ""))
    extra_l = shlex.split(os.environ.get("BLOCKCRYPT_ENGINE_LDFLAGS", ""))
    return Extension(
        "blockcrypt._engine",
        sources=sources,
        include_dirs=["native"] + fuse_inc,
        library_dirs=fuse_libdirs,
        libraries=["crypto", "sodium", "gcrypt"] + [lib for lib in fuse_libs if lib != "pthread"],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11", "-pthread"] + fuse_other + extra_c,
        extra_link_args=["-pthread"] + extra_l,
        depends=sorted(glob.glob("native/engine/*.h") + glob.glob("native/session/*.h") + ["native/py_engine.h"]),
    )


setup(
    ext_modules=[
        Extension(
            "blockcrypt._xts",
            sources=["native/blockcrypt_xts.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=c11"],
        ),
        Extension(
            "blockcrypt._aead",
            sources=["native/blockcrypt_aead.c"],
            libraries=["sodium"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=c11"],
        ),
        _engine_extension(),
    ]
)
