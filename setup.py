"""Build the native sector-crypto cores: blockcrypt._native (AES-256-XTS over OpenSSL libcrypto)
and blockcrypt._sodium (XChaCha20-Poly1305 per sector over libsodium, the platform layer of
double encryption)."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "blockcrypt._native",
            sources=["native/blockcrypt_native.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=c11"],
        ),
        Extension(
            "blockcrypt._sodium",
            sources=["native/blockcrypt_sodium.c"],
            libraries=["sodium"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=c11"],
        ),
    ]
)
