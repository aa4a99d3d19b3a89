"""RSA-HSM keys: key pairs generated in (or imported into) a PKCS#11 token and
used there; the private key is created sensitive and non-extractable and never
leaves the token. The vault stores only the object label
(``NAME/VERSION``) and the public part.

What RSA-HSM supports depends on the token, probed once at start-up with a
throw-away session key pair:

- RSA-OAEP (SHA-1, MGF1-SHA-1): always required; wrapKey/unwrapKey/encrypt/decrypt.
- RSA-OAEP-256: only if the token does OAEP with SHA-256. SoftHSM2 does not
  (it offers CKM_RSA_PKCS_OAEP with SHA-1 only), so with SoftHSM2 an RSA-HSM key
  answers RSA-OAEP-256 with 400 BadParameter, for wrap as well as unwrap, so that
  nothing gets wrapped that could not be unwrapped.

Caveats: one PKCS#11 session guarded by a lock (tokens serialise anyway);
the user PIN is read from a file at start-up; purging an RSA-HSM key destroys
its token objects, and a crash between the database purge and the object
destruction leaves an orphan object (harmless, never used again).
"""
from __future__ import annotations

import threading
from pathlib import Path

from ..._util.b64 import b64u_encode
from ...errors import StateError, UsageError

ALG_OAEP = "RSA-OAEP"
ALG_OAEP_256 = "RSA-OAEP-256"


def _b64u(i: int | bytes) -> str:
    """JWK big-endian integer: no leading zero bytes (a zero is one zero byte)."""
    b = i if isinstance(i, bytes) else i.to_bytes((i.bit_length() + 7) // 8, "big")
    return b64u_encode(b.lstrip(b"\0") or b"\0")


class Hsm:
    def __init__(self, module_path: str, token_label: str, pin: str):
        import pkcs11
        from pkcs11 import Attribute, KeyType, Mechanism, MGF, ObjectClass
        self._p = pkcs11
        self._A, self._KT, self._M, self._MGF, self._OC = Attribute, KeyType, Mechanism, MGF, ObjectClass
        try:
            lib = pkcs11.lib(module_path)
            self.token = lib.get_token(token_label=token_label)
            self.session = self.token.open(user_pin=pin, rw=True)
        except (pkcs11.PKCS11Error, RuntimeError, OSError) as e:
            raise StateError(path=module_path, why=f"cannot open PKCS#11 token {token_label!r}: "
                                                   f"{type(e).__name__}") from None
        self._lock = threading.Lock()
        self.algorithms = self._probe()

    def _params(self, alg: str):
        if alg == ALG_OAEP_256:
            return (self._M.SHA256, self._MGF.SHA256, None)
        return (self._M.SHA_1, self._MGF.SHA1, None)

    def _probe(self) -> tuple[str, ...]:
        algs = [ALG_OAEP]
        with self._lock:
            pub, priv = self.session.generate_keypair(self._KT.RSA, 2048, store=False, label="blockcrypt-probe")
            try:
                ct = pub.encrypt(b"probe", mechanism=self._M.RSA_PKCS_OAEP,
                                 mechanism_param=self._params(ALG_OAEP_256))
                if priv.decrypt(ct, mechanism=self._M.RSA_PKCS_OAEP,
                                mechanism_param=self._params(ALG_OAEP_256)) == b"probe":
                    algs.append(ALG_OAEP_256)
            except self._p.PKCS11Error:
                pass
            finally:
                for o in (pub, priv):
                    try:
                        o.destroy()
                    except self._p.PKCS11Error:
                        pass
        return tuple(algs)

    def _templates(self, label: str):
        A = self._A
        priv = {A.TOKEN: True, A.PRIVATE: True, A.SENSITIVE: True, A.EXTRACTABLE: False, A.DECRYPT: True,
                A.UNWRAP: True, A.SIGN: False, A.LABEL: label, A.ID: label.encode()}
        pub = {A.TOKEN: True, A.ENCRYPT: True, A.WRAP: True, A.VERIFY: False, A.LABEL: label, A.ID: label.encode()}
        return priv, pub

    def generate(self, *, label: str, key_size_bits: int) -> tuple[str, str]:
        priv_t, pub_t = self._templates(label)
        with self._lock:
            pub, _ = self.session.generate_keypair(self._KT.RSA, key_size_bits, store=True, label=label,
                                                   id=label.encode(), private_template=priv_t,
                                                   public_template=pub_t)
            return _b64u(pub[self._A.MODULUS]), _b64u(pub[self._A.PUBLIC_EXPONENT])

    def import_rsa(self, *, label: str, private_key) -> tuple[str, str]:
        A, OC, KT = self._A, self._OC, self._KT
        pn = private_key.private_numbers()
        n, e = pn.public_numbers.n, pn.public_numbers.e

        def b(i):
            return i.to_bytes((i.bit_length() + 7) // 8, "big")
        priv_t, pub_t = self._templates(label)
        with self._lock:
            self.session.create_object({**priv_t, A.CLASS: OC.PRIVATE_KEY, A.KEY_TYPE: KT.RSA, A.MODULUS: b(n),
                                        A.PUBLIC_EXPONENT: b(e), A.PRIVATE_EXPONENT: b(pn.d), A.PRIME_1: b(pn.p),
                                        A.PRIME_2: b(pn.q), A.EXPONENT_1: b(pn.dmp1), A.EXPONENT_2: b(pn.dmq1),
                                        A.COEFFICIENT: b(pn.iqmp)})
            self.session.create_object({**pub_t, A.CLASS: OC.PUBLIC_KEY, A.KEY_TYPE: KT.RSA, A.MODULUS: b(n),
                                        A.PUBLIC_EXPONENT: b(e)})
        return _b64u(n), _b64u(e)

    def _get(self, label: str, cls):
        return self.session.get_key(object_class=cls, key_type=self._KT.RSA, label=label)

    def encrypt(self, label: str, alg: str, value: bytes) -> bytes:
        with self._lock:
            key = self._get(label, self._OC.PUBLIC_KEY)
            return key.encrypt(value, mechanism=self._M.RSA_PKCS_OAEP, mechanism_param=self._params(alg))

    def decrypt(self, label: str, alg: str, value: bytes) -> bytes:
        with self._lock:
            key = self._get(label, self._OC.PRIVATE_KEY)
            try:
                return key.decrypt(value, mechanism=self._M.RSA_PKCS_OAEP, mechanism_param=self._params(alg))
            except self._p.PKCS11Error as e:
                raise ValueError(f"token refused to decrypt: {type(e).__name__}") from None

    def destroy(self, label: str) -> None:
        with self._lock:
            for obj in list(self.session.get_objects({self._A.LABEL: label})):
                obj.destroy()

    def close(self) -> None:
        with self._lock:
            self.session.close()


def open_hsm(module_path: str, token_label: str, pin_file: str) -> Hsm:
    try:
        pin = Path(pin_file).read_text().strip()
    except OSError as e:
        raise UsageError(f"cannot read the HSM PIN file {pin_file}: {e.strerror}") from None
    if not pin:
        raise UsageError(f"the HSM PIN file {pin_file} is empty")
    return Hsm(module_path, token_label, pin)
