"""Build the native sector-crypto core (blockcrypt._native) against OpenSSL libcrypto."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "blockcrypt._native",
            sources=["native/blockcrypt_native.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=c11"],
        )
    ]
)
