"""CURVE keys for actors on another host: key generation, key loading, the ZAP allow-list.

With ``transport.curve_server_cert`` set (and ``transport.kind: tcp``), every tcp socket that
`sockets.make_socket` builds is encrypted and authenticated (CurveZMQ):

* a socket that **binds** (replay inserts and sampling, the learner's weights PUB, the Gorila
  parameter server) is a CURVE server with the server's secret key; the ZMQ context runs one
  ZAP handler (`zmq.auth.thread.ThreadAuthenticator`) that lets in only clients whose public
  key is in ``transport.curve_authorized_dir``. A client with another key is refused during
  the handshake (its messages never reach the socket); a client without CURVE fails the
  handshake (mechanism mismatch) before any message is read.
* a socket that **connects** (actors, learner, evaluator) is a CURVE client with this host's
  client certificate (``transport.curve_client_cert``) and the server's public key.

Files are zmq's own certificate format (`zmq.auth.create_certificates` / `load_certificate`)::

    <out>/                      0700
      server.key                server public cert: copy to every actor host
      server.key_secret         server secret cert: stays on the host that binds
      authorized/client-K.key   client public certs allowed in (transport.curve_authorized_dir)
      clients/client-K.key_secret  one client secret cert per host (transport.curve_client_cert)

Every file is written 0600; secret certs readable by group or others are refused on load.
The allow-list is read when the first CURVE server socket of a process binds: restart the
replay and learner after adding or removing a client cert.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from apex_local.errors import BadInputError

__all__ = ["CurveKeyError", "KeySet", "RunContext", "curve_enabled", "weights_over_pub", "generate_keys",
           "load_cert", "load_authorized", "check_key_files", "secure_socket", "auth_stats"]

log = logging.getLogger(__name__)

SERVER_NAME = "server"
AUTHORIZED_DIR = "authorized"
CLIENTS_DIR = "clients"


class CurveKeyError(BadInputError):
    """A CURVE key file or directory is missing, unreadable, malformed or too open (exit 2)."""


def curve_enabled(transport: Any) -> bool:
    """True when the run's tcp sockets use CURVE (``transport.curve_server_cert`` is set)."""
    t = getattr(transport, "transport", transport)
    return bool(getattr(t, "curve_server_cert", ""))


def weights_over_pub(transport: Any) -> bool:
    """True when the learner also publishes weights on its PUB socket (``endpoints()['weights']``):
    ``transport.weights_transport: pub`` or CURVE on (remote actors may subscribe)."""
    t = getattr(transport, "transport", transport)
    return getattr(t, "weights_transport", "board") == "pub" or curve_enabled(t)


# --------------------------------------------------------------------------- generation


@dataclass
class KeySet:
    """What `generate_keys` wrote."""
    out_dir: Path
    server_public: Path
    server_secret: Path
    authorized_dir: Path
    client_secrets: list[Path] = field(default_factory=list)
    client_publics: list[Path] = field(default_factory=list)

    def files(self) -> list[Path]:
        return [self.server_public, self.server_secret, *self.client_publics, *self.client_secrets,
                *(self.authorized_dir / p.name for p in self.client_publics)]

    def config_lines(self, client: int = 1) -> str:
        """The transport lines for the host that binds (replay, learner) and for an actor host."""
        c = self.client_secrets[client - 1]
        return (
            "# host A (replay, learner, evaluator, local actors):\n"
            "transport:\n  kind: tcp\n  host: <host A address>\n"
            f"  curve_server_cert: {self.server_secret}\n"
            f"  curve_client_cert: {c}\n"
            f"  curve_authorized_dir: {self.authorized_dir}\n"
            "# host B (remote actors; copy server.key and one clients/client-K.key_secret there):\n"
            "transport:\n  kind: tcp\n  host: <host A address>\n  weights_transport: pub\n"
            f"  curve_server_cert: <dir>/{self.server_public.name}\n"
            f"  curve_client_cert: <dir>/{self.client_secrets[-1].name}\n")


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def generate_keys(out_dir: str | os.PathLike, clients: int = 2, *, force: bool = False) -> KeySet:
    """Write a server keypair and ``clients`` client keypairs (Z85, `zmq.curve_keypair`) under
    ``out_dir`` (layout in the module docstring); every directory 0700, every file 0600.

    Refuses (`CurveKeyError`) to overwrite an existing key file unless ``force``; with
    ``force`` stale ``client-*`` certs beyond ``clients`` are removed, so they stop being authorized.
    """
    if clients < 1:
        raise CurveKeyError(f"--clients must be >= 1, got {clients}")
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise CurveKeyError(f"{out} exists and is not a directory")
    names = [f"client-{i}" for i in range(1, clients + 1)]
    ks = KeySet(out, out / f"{SERVER_NAME}.key", out / f"{SERVER_NAME}.key_secret", out / AUTHORIZED_DIR,
                [out / CLIENTS_DIR / f"{n}.key_secret" for n in names], [out / CLIENTS_DIR / f"{n}.key" for n in names])
    stale = sorted(p for d in (out / AUTHORIZED_DIR, out / CLIENTS_DIR) if d.is_dir()
                   for p in d.glob("client-*.key*") if p not in set(ks.files()))
    existing = [p for p in ks.files() if os.path.lexists(p)]
    if (existing or stale) and not force:
        shown = ", ".join(str(p) for p in (existing or stale)[:3])
        raise CurveKeyError(f"refusing to overwrite existing keys in {out} ({shown}"
                            f"{', ...' if len(existing or stale) > 3 else ''}); pass --force to replace them "
                            "(every host then needs the new files)")
    old_umask = os.umask(0o077)  # files are created 0600: never readable by others, not even briefly
    try:
        for p in (*stale, *existing):
            p.unlink()
        for d in (out, out / AUTHORIZED_DIR, out / CLIENTS_DIR):
            _private_dir(d)
        zmq.auth.create_certificates(str(out), SERVER_NAME)
        for name in names:
            pub, _ = zmq.auth.create_certificates(str(out / CLIENTS_DIR), name)
            (out / AUTHORIZED_DIR / f"{name}.key").write_bytes(Path(pub).read_bytes())
        for p in ks.files():
            os.chmod(p, 0o600)
    except OSError as exc:
        raise CurveKeyError(f"cannot write keys to {out}: {exc}") from None
    finally:
        os.umask(old_umask)
    return ks


# --------------------------------------------------------------------------- loading


def _check_key(key: bytes | None, what: str) -> bytes:
    if not key or len(key) != 40:
        raise ValueError(f"no valid {what} (a 40-character Z85 string)")
    try:
        if len(z85.decode(key)) != 32:
            raise ValueError
    except Exception:  # noqa: BLE001 - z85 raises ValueError/KeyError on bad characters
        raise ValueError(f"the {what} is not valid Z85") from None
    return key


def load_cert(path: str, field_name: str, *, need_secret: bool) -> tuple[bytes, bytes | None]:
    """(public key, secret key or None) from a zmq certificate file; `CurveKeyError` naming
    ``field_name`` when the file is missing, unreadable, malformed, lacks a needed secret key,
    or (secret certs) is readable by group or others."""
    where = f"{field_name}: {path}"
    p = Path(path).expanduser()
    try:
        st = p.stat()
        public, secret = zmq.auth.load_certificate(str(p))
    except FileNotFoundError:
        raise CurveKeyError(f"{where}: no such file (generate keys with `apex-local keys --out DIR`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CurveKeyError(f"{where}: cannot read it ({exc})") from None
    except ValueError as exc:
        raise CurveKeyError(f"{where}: not a zmq certificate ({exc})") from None
    try:
        _check_key(public, "public-key")
        if secret is not None:
            _check_key(secret, "secret-key")
            if zmq.curve_public(secret) != public:
                raise ValueError("its secret-key does not belong to its public-key")
    except ValueError as exc:
        raise CurveKeyError(f"{where}: malformed certificate: {exc}") from None
    if need_secret and secret is None:
        raise CurveKeyError(f"{where}: has no secret key; this process needs the secret certificate "
                            "(the .key_secret file, not the public .key)")
    if secret is not None and st.st_mode & 0o077:
        raise CurveKeyError(f"{where}: secret key file is readable by group or others (mode "
                            f"{stat.S_IMODE(st.st_mode):o}); run `chmod 600 {p}`")
    return public, secret


def load_authorized(path: str, field_name: str = "transport.curve_authorized_dir") -> frozenset[bytes]:
    """The public keys of every ``*.key`` certificate in ``path``; `CurveKeyError` when the
    directory is missing or unset, holds no certificate, or holds a malformed one."""
    if not path:
        raise CurveKeyError(f"{field_name} is empty: a process that binds CURVE sockets needs the directory "
                            "of authorized client public certs (`authorized/` from apex-local keys)")
    d = Path(path).expanduser()
    if not d.is_dir():
        raise CurveKeyError(f"{field_name}: {path}: no such directory")
    keys = {load_cert(str(f), field_name, need_secret=False)[0] for f in sorted(d.glob("*.key"))}
    if not keys:
        raise CurveKeyError(f"{field_name}: {path}: no client certificate (*.key) in it: nobody could connect")
    return frozenset(keys)


def check_key_files(transport: Any) -> list[str]:
    """Load every key file the config names (as `apex-local check-config` does); a list of
    what was checked, or `CurveKeyError`."""
    t = getattr(transport, "transport", transport)
    if not curve_enabled(t):
        return []
    _, s = load_cert(t.curve_server_cert, "transport.curve_server_cert", need_secret=False)
    out = [f"server cert {t.curve_server_cert} ({'with' if s else 'public, no'} secret key)"]
    load_cert(t.curve_client_cert, "transport.curve_client_cert", need_secret=True)
    out.append(f"client cert {t.curve_client_cert}")
    if t.curve_authorized_dir:
        out.append(f"{len(load_authorized(t.curve_authorized_dir))} authorized client key(s) in {t.curve_authorized_dir}")
    return out


# --------------------------------------------------------------------------- sockets


class _AllowList:
    """ZAP credentials provider: the authorized public keys; counts and logs refusals."""

    def __init__(self, keys: frozenset[bytes], where: str) -> None:
        self.keys, self.where = keys, where
        self.stats = {"allowed": 0, "denied": 0}

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            self.stats["allowed"] += 1
            return True
        self.stats["denied"] += 1
        n = self.stats["denied"]
        if n <= 3 or n % 100 == 0:
            log.warning("CURVE: refused a client whose key %s... is not in %s (%d refused so far)",
                        key[:8].decode("ascii", "replace"), self.where, n)
        return False


class RunContext(zmq.Context):
    """The ZMQ context of a process (`sockets.new_context`). It owns the process's ZAP
    authenticator, started by the first CURVE server socket, and stops it in `term` /
    `destroy` (a running authenticator would keep ``term()`` waiting forever)."""

    _apex_auth: ThreadAuthenticator | None = None
    _apex_allow: _AllowList | None = None

    def authenticator(self, transport: Any) -> _AllowList:
        if self._apex_auth is None:
            t = getattr(transport, "transport", transport)
            allow = _AllowList(load_authorized(t.curve_authorized_dir), t.curve_authorized_dir)
            auth = ThreadAuthenticator(self, log=logging.getLogger(__name__ + ".zap"))
            auth.start()
            auth.configure_curve_callback(domain="*", credentials_provider=allow)
            self._apex_auth, self._apex_allow = auth, allow
        return self._apex_allow

    def _stop_auth(self) -> None:
        auth, self._apex_auth = self._apex_auth, None
        if auth is not None:
            auth.stop()

    def term(self) -> None:
        self._stop_auth()
        super().term()

    def destroy(self, linger: int | None = None) -> None:
        self._stop_auth()
        super().destroy(linger)


def auth_stats(ctx: Any) -> dict[str, int]:
    """{'allowed': n, 'denied': n} of the context's ZAP handler (zeros without CURVE)."""
    allow = getattr(ctx, "_apex_allow", None)
    return dict(allow.stats) if allow is not None else {"allowed": 0, "denied": 0}


def secure_socket(ctx: Any, sock: zmq.Socket, transport: Any, *, server: bool) -> None:
    """Make ``sock`` a CURVE server (binds; starts the context's ZAP allow-list) or client
    (connects). Call before bind/connect. `CurveKeyError` for a bad key file."""
    t = getattr(transport, "transport", transport)
    if server:
        if not isinstance(ctx, RunContext):
            raise TypeError("CURVE server sockets need a context from apex_local.transport.new_context()")
        public, secret = load_cert(t.curve_server_cert, "transport.curve_server_cert", need_secret=True)
        ctx.authenticator(t)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)  # ZAP domain '' = the allow-list's '*'
    else:
        server_public, _ = load_cert(t.curve_server_cert, "transport.curve_server_cert", need_secret=False)
        public, secret = load_cert(t.curve_client_cert, "transport.curve_client_cert", need_secret=True)
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
