"""``sd3plugin-cache keygen -o KEY``: an Ed25519 key pair for signed archives (KEY and KEY.pub)."""
from __future__ import annotations

from .common import add_common, emit


def add_parser(sub):
    p = sub.add_parser("keygen", help="make an Ed25519 key pair to sign archives (pack --sign KEY, "
                                      "install --trust KEY.pub)",
                       description="Writes the private key KEY (PEM, mode 0600: keep it on the machine that "
                                   "packs) and the public key KEY.pub (give it to the servers: install --trust "
                                   "KEY.pub or SD3PLUGIN_TRUSTED_KEY=KEY.pub).")
    p.add_argument("-o", "--output", required=True, metavar="KEY", help="private key file to write")
    p.add_argument("--force", action="store_true", help="replace existing key files")
    return add_common(p, overrides=False, cache_dir_help="accepted as by every command; the key files go to "
                                                           "-o, not into the cache dir")


def run(args) -> int:
    from sd3plugin.cache.signing import keygen

    priv, pub, kid = keygen(args.output, force=args.force)
    emit(args, {"ok": True, "private_key": str(priv), "public_key": str(pub), "key_id": kid},
         f"wrote {priv} (private, keep it secret) and {pub} (public); key id {kid}\n"
         f"sign: sd3plugin-cache pack -o ARCHIVE --sign {priv}\n"
         f"trust: sd3plugin-cache install ARCHIVE --trust {pub}  (or SD3PLUGIN_TRUSTED_KEY={pub})")
    return 0
