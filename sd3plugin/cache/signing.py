"""Signed archives: Ed25519 detached signatures (``ARCHIVE.sig``) over the archive's sha256.

``pack --sign KEY`` writes the signature; ``install --trust PUBKEY`` and ``SD3PLUGIN_TRUSTED_KEY`` (a
list of public-key files separated by ``:``; ``--trust`` adds to it) refuse an archive that is unsigned
or whose signature does not verify with one of the trusted keys, before reading anything of the archive
but its bytes for the hash. A trust setting that is present but names no key is an error, never "no
signature needed". Keys are PEM files (PKCS#8 private key, SubjectPublicKeyInfo public key), as written by
``sd3plugin-cache keygen`` or ``openssl genpkey -algorithm ed25519``.

The signature file is four text lines::

    sd3plugin-cache-signature/1
    archive-sha256: <hex>
    key-id: <first 16 hex digits of the sha256 of the raw public key>
    signature: <base64 of the Ed25519 signature of the first two lines>
"""
from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from ..errors import ConfigError
from .errors import CacheWriteError, UntrustedArchiveError
from ..regular_file import read_regular

MAGIC = "sd3plugin-cache-signature/1"
SUFFIX = ".sig"
ENV_TRUSTED = "SD3PLUGIN_TRUSTED_KEY"
MAX_SIG_BYTES = 4096
MAX_KEY_BYTES = 16384


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - a dependency of sd3plugin
        raise ConfigError("signed archives need the 'cryptography' package: pip install cryptography") from None
    return serialization, ed25519


def key_id(public_key) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _read_key_file(path: str | Path, what: str) -> bytes:
    path = Path(path).expanduser()
    try:
        data = read_regular(path, MAX_KEY_BYTES)
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {str(path)!r}: {exc.strerror}") from None
    if len(data) > MAX_KEY_BYTES:
        raise ConfigError(f"{str(path)!r} is not an Ed25519 {what} (over {MAX_KEY_BYTES} bytes)")
    return data


def load_private_key(path: str | Path):
    serialization, ed25519 = _crypto()
    data = _read_key_file(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{str(path)!r} is not an unencrypted Ed25519 private key in PEM ({exc}); make one "
                          "with `sd3plugin-cache keygen -o KEY`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{str(path)!r} is a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_key(path: str | Path):
    serialization, ed25519 = _crypto()
    data = _read_key_file(path, "trusted key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        try:  # a private key also gives its public key
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{str(path)!r} is not an Ed25519 public key in PEM ({exc}); use the KEY.pub "
                              "that `sd3plugin-cache keygen` wrote") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"{str(path)!r} is a {type(key).__name__}, not an Ed25519 public key")
    return key


def trusted_keys(paths: list[str] | None = None) -> list:
    """The trusted public keys: those of ``$SD3PLUGIN_TRUSTED_KEY`` plus the ``--trust`` files (``--trust``
    adds to the environment's keys, it never replaces them).

    Fails closed: a setting that is present but names no key (``--trust ""``, the variable set to
    ``""``, ``" "``, ``":"``...) is a ConfigError, never "no key, so no signature needed".
    """
    keys, seen = [], set()
    env = os.environ.get(ENV_TRUSTED)
    if env is not None:
        names = [p for p in env.split(os.pathsep) if p.strip()]
        if not names:
            raise ConfigError(f"${ENV_TRUSTED} is set to {env!r}, which names no key file; set it to the public "
                              f"key file(s) to trust (separated by {os.pathsep!r}), or unset it")
        for p in env.split(os.pathsep):
            if p and not p.strip():
                raise ConfigError(f"${ENV_TRUSTED} {env!r} has an empty or blank key file name; remove it")
        keys += [(p, "$" + ENV_TRUSTED) for p in env.split(os.pathsep) if p]
    for p in paths or []:
        if not isinstance(p, str) or not p.strip():
            raise ConfigError(f"--trust {p!r} names no key file; give the path of an Ed25519 public key (PEM)")
        keys.append((p, "--trust"))
    out = []
    for p, _ in keys:
        key = load_public_key(p)
        if key_id(key) not in seen:
            seen.add(key_id(key))
            out.append(key)
    return out


def _message(digest: str) -> bytes:
    return f"{MAGIC}\narchive-sha256: {digest}\n".encode()


def sign(private_key, digest: str) -> bytes:
    """The signature file's content for an archive of sha256 ``digest``."""
    sig = base64.b64encode(private_key.sign(_message(digest))).decode()
    return (_message(digest).decode() + f"key-id: {key_id(private_key.public_key())}\nsignature: {sig}\n").encode()


def write_signature(archive: Path, private_key, digest: str) -> Path:
    from . import store

    path = Path(str(archive) + SUFFIX)
    try:
        store.atomic_write(path, sign(private_key, digest))
    except OSError as exc:
        raise CacheWriteError(f"cannot write {str(path)!r}: {exc.strerror}") from None
    return path


def read_signature(path: Path, archive: Path) -> dict:
    """The fields of a signature file; UntrustedArchiveError when missing or malformed."""
    try:
        data = read_regular(path, MAX_SIG_BYTES)
    except FileNotFoundError:
        raise UntrustedArchiveError(
            f"{archive}: not signed (no {path.name} beside it) and a trusted key is set (--trust or "
            f"${ENV_TRUSTED}); refusing to install it. Sign it with `sd3plugin-cache pack --sign KEY`") from None
    except OSError as exc:
        raise UntrustedArchiveError(f"{archive}: cannot read its signature {str(path)!r}: {exc.strerror}") from None
    bad = UntrustedArchiveError(f"{archive}: {path.name} is not an sd3plugin-cache signature; refusing to install")
    if len(data) > MAX_SIG_BYTES:
        raise bad
    try:
        lines = data.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise bad from None
    if len(lines) != 4 or lines[0] != MAGIC:
        raise bad
    fields = {}
    for line in lines[1:]:
        k, sep, v = line.partition(": ")
        if not sep:
            raise bad
        fields[k] = v
    digest = fields.get("archive-sha256", "")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise bad
    try:
        fields["raw"] = base64.b64decode(fields.get("signature", ""), validate=True)
    except ValueError:
        raise bad from None
    return fields


def check(archive: Path, signature: Path, digest: str, keys: list) -> str:
    """Raise UntrustedArchiveError unless ``signature`` signs ``digest`` with one of ``keys``; the key id."""
    from cryptography.exceptions import InvalidSignature

    fields = read_signature(signature, archive)
    if fields["archive-sha256"] != digest:
        raise UntrustedArchiveError(f"{archive}: its signature is for another archive (sha256 "
                                    f"{fields['archive-sha256'][:16]}..., this one {digest[:16]}...); the archive "
                                    "or its .sig was replaced; refusing to install")
    for key in keys:
        try:
            key.verify(fields["raw"], _message(digest))
        except InvalidSignature:
            continue
        return key_id(key)
    ids = ", ".join(key_id(k) for k in keys)
    raise UntrustedArchiveError(f"{archive}: signature by key {fields.get('key-id', '?')} does not verify with the "
                                f"trusted key(s) {ids}; refusing to install")


def keygen(output: str | Path, force: bool = False) -> tuple[Path, Path, str]:
    """Write a new Ed25519 private key (mode 0600) and its public key ``output.pub``."""
    serialization, ed25519 = _crypto()
    out = Path(output).expanduser()
    pub = Path(str(out) + ".pub")
    for p in (out, pub):
        if p.exists() and not force:
            raise ConfigError(f"{str(p)!r} exists; pass --force to replace it")
    key = ed25519.Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(priv_pem)
        os.replace(tmp, out)
        from . import store

        store.atomic_write(pub, pub_pem)
    except OSError as exc:
        raise CacheWriteError(f"cannot write {str(out)!r}: {exc.strerror}") from None
    return out, pub, key_id(key.public_key())
