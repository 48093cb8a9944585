"""The ``feed:`` section of the config file (documented in :mod:`pipeline.web`)."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from emrwatch.timeutil import zone
from pipeline.web.directory import DirectoryConfigError, DirectorySettings
from pipeline.web.users import ROLES, verify_password

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


if TYPE_CHECKING:
    from pipeline.signing import Signer

SECRET_ENV_DEFAULT = "EMRWATCH_FEED_SECRET"
_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")


class FeedConfigError(ValueError):
    """A feed setting that cannot be used; the message names the key."""


@dataclass(frozen=True)
class User:
    username: str
    password_hash: str
    role: str
    display_name: str = ""
    #: the user's second factor: a TOTP secret (base32; ``emrwatch users hash --totp``
    #: makes one). With it, a login asks for the authenticator's code after the password.
    totp_secret: str = ""
    #: the password is the user's account in the hospital's directory (``feed.directory``,
    #: LDAP or Active Directory), not a ``password_hash`` here
    directory: bool = False

    @property
    def label(self) -> str:
        return self.display_name or self.username


@dataclass(frozen=True)
class FeedSettings:
    users: tuple[User, ...] = ()
    secret: str = ""  # signs the session cookies; prefer secret_env
    secret_env: str = SECRET_ENV_DEFAULT
    session_max_age_s: int = 8 * 3600
    #: sign a user out after this many seconds without a request of theirs (the live
    #: event stream does not count); pages then go to the login. 0: only the max age
    idle_timeout_s: int = 0
    secure_cookies: bool = False  # true behind HTTPS: cookies never travel in clear
    tls_cert_file: str = ""  # serve HTTPS itself: the certificate chain (PEM) ...
    tls_key_file: str = ""  # ... and its private key (PEM)
    page_size: int = 50
    poll_interval_s: float = 0.5
    scan_interval_s: float = 2.0
    unmask_ttl_s: int = 900
    #: failed sign-ins (wrong password or code) for one username within
    #: ``login_lockout_s`` that lock it for up to that long
    login_max_failures: int = 5
    login_lockout_s: float = 60.0
    #: failed sign-ins from one address (any usernames: password spraying) within
    #: ``login_address_lockout_s`` that lock the address for up to that long
    login_max_failures_per_address: int = 30
    login_address_lockout_s: float = 900.0
    #: reverse proxies in front of the feed (addresses or CIDR networks): from them, the
    #: client's address is read from ``X-Forwarded-For`` (for the per-address throttle
    #: and the audit log); from anywhere else the header is ignored
    trusted_proxies: tuple[str, ...] = ()
    title: str = "emrwatch"
    #: every user must have a second factor (``totp_secret``); a user without one is
    #: refused when the settings load
    require_totp: bool = False
    #: the hospital's directory (LDAP, Active Directory) that checks the passwords of users
    #: marked ``directory: true`` (pipeline.web.directory)
    directory: DirectorySettings | None = None
    hospital: str = ""  # the hospital's name in its security assessment (default: title)
    #: sign the assessment JSON the feed gives out (Ed25519) with this private key file
    #: (``emrwatch assessment-keygen``; the regulator holds the public key) ...
    assessment_key_file: str = ""
    #: ... encrypted with the passphrase in this environment variable ("": not encrypted)
    assessment_key_passphrase_env: str = ""
    #: or (HMAC-SHA256) with the key in this environment variable, shared with the
    #: regulator ("" for both: unsigned)
    assessment_key_env: str = ""
    timezone: str = "Asia/Shanghai"  # the hospital's: report periods are its local dates
    #: an ``emrwatch history`` export (context CSVs and an events file) the access report
    #: page reads (pipeline.web.access); "" leaves the page without history
    history_dir: str = ""
    #: keep ``history_dir`` current from the topics: ``emrwatch alerts`` runs an
    #: ``emrwatch history --update`` into it at start and then every this many seconds
    #: (0: never; something else refreshes the directory)
    history_refresh_s: float = 0.0
    #: with ``history_refresh_s``: keep only this many days of events (0: all of them;
    #: a report needs 14 days of history before its period)
    history_keep_days: float = 0.0
    host: str = "127.0.0.1"  # where ``emrwatch run`` serves the feed
    port: int = 8080
    _generated_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)

    @classmethod
    def load(cls, path: str | Path | None) -> FeedSettings:
        """From the ``feed:`` section of a YAML file (a file without it: defaults, no users)."""
        if path is None:
            return cls()
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise FeedConfigError(f"{path}: top level must be a mapping")
        return cls.from_dict(data.get("feed") or {}, source=f"{path}: feed")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "feed") -> FeedSettings:
        data = dict(data)
        users = []
        for i, u in enumerate(data.pop("users", None) or []):
            if not isinstance(u, dict):
                raise FeedConfigError(f"{source}: users[{i}] must be a mapping")
            users.append(User(**_check(User, dict(u), f"{source}: users[{i}]")))
        known = {f.name for f in fields(cls) if not f.name.startswith("_")}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FeedConfigError(f"{source}: unknown setting(s) {unknown}; known: {sorted(known)}")
        if data.get("directory") is not None:
            try:
                data["directory"] = DirectorySettings.from_dict(
                    data["directory"], f"{source}: directory"
                )
            except DirectoryConfigError as exc:
                raise FeedConfigError(str(exc)) from None
        if isinstance(data.get("trusted_proxies"), list):
            data["trusted_proxies"] = tuple(str(p) for p in data["trusted_proxies"])
        out = cls(users=tuple(users), **data)
        out.validate(source)
        return out

    @classmethod
    def for_demo(cls, **kw: Any) -> tuple[FeedSettings, dict[str, str]]:
        """Settings with one user per role (``analyst``, ``supervisor``, ``auditor``) and
        fresh random passwords, for ``emrwatch demo``; returns (settings, passwords)."""
        from pipeline.web.users import hash_password

        passwords = {role: secrets.token_urlsafe(9) for role in ROLES}
        users = tuple(User(role, hash_password(pw), role) for role, pw in passwords.items())
        return cls(users=users, **kw), passwords

    def with_users(self, *users: User) -> FeedSettings:
        return replace(self, users=tuple(users))

    def check_password(self, user: User, password: str) -> bool:
        """``password`` against the user's hash, or the hospital's directory for a
        ``directory: true`` user (may raise ``DirectoryUnavailable``). Blocking."""
        if user.directory:
            from pipeline.web.directory import Directory

            return self.directory is not None and Directory(self.directory).check_password(
                user.username, password
            )
        return verify_password(user.password_hash, password)

    def assessment_signer(self) -> Signer | None:
        """What signs the assessment JSON the feed gives out (None: unsigned)."""
        from pipeline.signing import SignatureError, load_private_key, shared_key_from_env

        try:
            if self.assessment_key_file:
                return load_private_key(
                    self.assessment_key_file, self.assessment_key_passphrase_env or None
                )
            if self.assessment_key_env:
                return shared_key_from_env(self.assessment_key_env)
        except SignatureError as exc:
            which = "assessment_key_file" if self.assessment_key_file else "assessment_key_env"
            raise FeedConfigError(f"feed: {which}: {exc}") from None
        return None

    def validate(self, source: str = "feed") -> None:
        try:
            zone(self.timezone)
        except ValueError as exc:
            raise FeedConfigError(f"{source}: timezone: {exc}") from None
        seen: set[str] = set()
        for u in self.users:
            if not _USERNAME.match(str(u.username)):
                raise FeedConfigError(f"{source}: users: bad username {u.username!r}")
            if u.username in seen:
                raise FeedConfigError(f"{source}: users: {u.username} is listed twice")
            seen.add(u.username)
            if u.role not in ROLES:
                raise FeedConfigError(
                    f"{source}: users: {u.username} has role {u.role!r}; roles are {ROLES}"
                )
            if u.totp_secret:
                from pipeline.web.totp import secret_bytes

                try:
                    secret_bytes(u.totp_secret)
                except ValueError as exc:
                    raise FeedConfigError(
                        f"{source}: users: {u.username}: totp_secret: {exc} (make one with: "
                        "emrwatch users hash --totp)"
                    ) from None
            elif self.require_totp:
                raise FeedConfigError(
                    f"{source}: users: {u.username} has no totp_secret, and require_totp is "
                    "set (make one with: emrwatch users hash --totp)"
                )
            if u.directory:
                if self.directory is None:
                    raise FeedConfigError(
                        f"{source}: users: {u.username} signs in with the directory "
                        "(directory: true), but feed.directory is not set"
                    )
            elif not str(u.password_hash).startswith("$argon2"):
                raise FeedConfigError(
                    f"{source}: users: {u.username}: password_hash must be an argon2 hash "
                    "(make one with: python -m pipeline.web.users hash)"
                )
        for name in (
            "session_max_age_s",
            "page_size",
            "poll_interval_s",
            "unmask_ttl_s",
            "login_max_failures",
            "login_lockout_s",
            "login_max_failures_per_address",
            "login_address_lockout_s",
        ):
            if getattr(self, name) <= 0:
                raise FeedConfigError(f"{source}: {name} must be positive")
        if not 0 <= int(self.port) <= 65535:
            raise FeedConfigError(f"{source}: port must be 0..65535")
        if not 1 <= self.page_size <= 500:
            raise FeedConfigError(f"{source}: page_size must be 1..500")
        if isinstance(self.trusted_proxies, str):
            raise FeedConfigError(f"{source}: trusted_proxies must be a list")
        try:
            trusted_networks(self.trusted_proxies)
        except ValueError as exc:
            raise FeedConfigError(f"{source}: trusted_proxies: {exc}") from None
        if self.idle_timeout_s < 0:
            raise FeedConfigError(f"{source}: idle_timeout_s must be 0 (off) or more")
        if self.history_refresh_s < 0:
            raise FeedConfigError(f"{source}: history_refresh_s must be 0 (never) or more")
        if self.assessment_key_env and len(os.environ.get(self.assessment_key_env, "")) < 16:
            raise FeedConfigError(
                f"{source}: assessment_key_env: ${self.assessment_key_env} must hold a key of "
                "16 bytes or more"
            )
        if self.assessment_key_file and self.assessment_key_env:
            raise FeedConfigError(
                f"{source}: give assessment_key_file (Ed25519) or assessment_key_env (HMAC), "
                "not both"
            )
        if self.assessment_key_file:
            self.assessment_signer()  # a key that cannot sign is refused at start
        elif self.assessment_key_passphrase_env:
            raise FeedConfigError(
                f"{source}: assessment_key_passphrase_env goes with assessment_key_file"
            )
        if self.history_keep_days < 0:
            raise FeedConfigError(f"{source}: history_keep_days must be 0 (all) or more")
        if self.history_keep_days and not self.history_refresh_s:
            raise FeedConfigError(
                f"{source}: history_keep_days applies to the history the service keeps: "
                "set history_refresh_s too"
            )
        if self.history_refresh_s and not self.history_dir:
            raise FeedConfigError(f"{source}: history_refresh_s needs history_dir to write to")
        if self.history_refresh_s:  # the service creates it; its parent must be there
            if not Path(self.history_dir).parent.is_dir():
                raise FeedConfigError(
                    f"{source}: history_dir: no directory {Path(self.history_dir).parent}"
                )
        elif self.history_dir and not Path(self.history_dir).is_dir():
            raise FeedConfigError(f"{source}: history_dir: no directory {self.history_dir}")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise FeedConfigError(f"{source}: tls_cert_file and tls_key_file go together")
        if self.tls_cert_file:
            import ssl

            for name in ("tls_cert_file", "tls_key_file"):
                if not Path(getattr(self, name)).is_file():
                    raise FeedConfigError(f"{source}: {name}: no file {getattr(self, name)}")
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    self.tls_cert_file, self.tls_key_file
                )
            except (ssl.SSLError, OSError) as exc:
                raise FeedConfigError(
                    f"{source}: tls_cert_file/tls_key_file cannot be used: {exc}"
                ) from None

    @property
    def tls(self) -> bool:
        """Whether the feed serves HTTPS itself."""
        return bool(self.tls_cert_file)

    @property
    def https_only_cookies(self) -> bool:
        """Session cookies marked Secure: behind a TLS proxy, or when serving HTTPS."""
        return self.secure_cookies or self.tls

    def user(self, username: str) -> User | None:
        for u in self.users:
            if u.username == username:
                return u
        return None

    def resolved_secret(self) -> tuple[str, str]:
        """(secret, where it came from). Without one, a random secret for this process:
        sessions then end when the server restarts."""
        if self.secret:
            return self.secret, "config"
        if self.secret_env and os.environ.get(self.secret_env):
            return os.environ[self.secret_env], f"${self.secret_env}"
        return self._generated_secret, "generated"


def _check(cls: Any, data: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise FeedConfigError(f"{where}: unknown setting(s) {unknown}; known: {sorted(names)}")
    directory = data.get("directory", False)
    if not isinstance(directory, bool):
        raise FeedConfigError(f"{where}: directory must be true or false")
    need = ("username", "role") if directory else ("username", "password_hash", "role")
    missing = [k for k in need if not data.get(k)]
    if missing:
        raise FeedConfigError(f"{where}: missing {missing}")
    if directory and data.get("password_hash"):
        raise FeedConfigError(
            f"{where}: a directory user's password is the directory's: no password_hash"
        )
    data.setdefault("password_hash", "")
    return {k: v if k == "directory" else str(v) for k, v in data.items()}


def trusted_networks(proxies: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``feed.trusted_proxies`` as networks (ValueError names a bad one)."""
    nets = []
    for p in proxies:
        try:
            nets.append(ipaddress.ip_network(str(p).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{p!r} is not an IP address or network (CIDR)") from None
    return tuple(nets)
