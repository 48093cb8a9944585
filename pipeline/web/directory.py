"""Passwords checked against the hospital's directory (LDAP: OpenLDAP, Active Directory).

Who may use the feed, and in which role, stays in the config file (``feed.users``): the
people who triage alerts cannot grant themselves rights, and a directory group alone does
not let anyone in. What moves to the directory is the password: a user listed with
``directory: true`` signs in with their hospital account's password, checked by binding
to the directory as that account. An account disabled or removed there can no longer sign
in, and with ``require_group`` one taken out of the group cannot either.

Two ways to find the account's entry:

* ``user_dn: "uid={username},ou=people,dc=hospital,dc=example"``: the entry's name is
  made from the username (escaped as an RDN value);
* ``search_base`` and ``search_filter`` (``(sAMAccountName={username})``, escaped as a
  filter value), searched with a service account (``bind_dn``, ``bind_password_env``):
  Active Directory, where names are not made from usernames. The search must find
  exactly one entry.

Passwords never cross the network in clear: ``ldaps://`` or ``start_tls`` is required
unless the directory is on this machine's loopback. An empty password is refused before
the directory is asked (LDAP treats a bind with an empty password as anonymous, and
succeeds). A directory that cannot be reached is :class:`DirectoryUnavailable`, told
apart from a wrong password.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import ssl
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)


class DirectoryConfigError(ValueError):
    """A ``feed.directory`` section that cannot work."""


class DirectoryUnavailable(Exception):
    """The directory could not be asked (down, refused the service account, bad TLS)."""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class DirectorySettings:
    url: str = ""  # ldaps://dc1.hospital.example, or ldap://… with start_tls
    start_tls: bool = False
    ca_file: str = ""  # the CA that signed the directory's certificate (default: system's)
    user_dn: str = ""  # "uid={username},ou=people,dc=hospital,dc=example" ...
    search_base: str = ""  # ... or search under this ...
    search_filter: str = "(uid={username})"  # ... with this filter (AD: sAMAccountName)
    bind_dn: str = ""  # the service account that searches
    bind_password_env: str = ""  # ... and the environment variable with its password
    require_group: str = ""  # the account must be a member of this group (its DN)
    timeout_s: float = 5.0

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> DirectorySettings:
        if not isinstance(data, dict):
            raise DirectoryConfigError(f"{source}: must be a mapping")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DirectoryConfigError(
                f"{source}: unknown setting(s) {unknown}; known: {sorted(known)}"
            )
        out = cls(**data)
        out.validate(source)
        return out

    def validate(self, source: str) -> None:
        u = urlparse(self.url)
        if u.scheme not in ("ldap", "ldaps") or not u.hostname:
            raise DirectoryConfigError(f"{source}: url: give ldaps://HOST[:PORT] or ldap://…")
        if u.scheme == "ldap" and not self.start_tls and not _loopback(u.hostname):
            raise DirectoryConfigError(
                f"{source}: passwords would cross the network in clear: use ldaps:// or "
                "start_tls: true"
            )
        if bool(self.user_dn) == bool(self.search_base):
            raise DirectoryConfigError(f"{source}: give user_dn or search_base (one of them)")
        if self.user_dn and "{username}" not in self.user_dn:
            raise DirectoryConfigError(f"{source}: user_dn must contain {{username}}")
        if self.search_base:
            if "{username}" not in self.search_filter:
                raise DirectoryConfigError(f"{source}: search_filter must contain {{username}}")
            if not self.bind_dn or not self.bind_password_env:
                raise DirectoryConfigError(
                    f"{source}: search_base needs the service account: bind_dn and "
                    "bind_password_env"
                )
            if not os.environ.get(self.bind_password_env):
                raise DirectoryConfigError(f"{source}: ${self.bind_password_env} is not set")
        if self.ca_file and not os.path.isfile(self.ca_file):
            raise DirectoryConfigError(f"{source}: ca_file: no file {self.ca_file}")
        if self.timeout_s <= 0:
            raise DirectoryConfigError(f"{source}: timeout_s must be positive")


class Directory:
    """Checks a password by binding as the account (:meth:`check_password`)."""

    def __init__(self, settings: DirectorySettings) -> None:
        self.settings = settings

    def _server(self) -> Any:
        """A new ldap3 server for each login: ldap3 remembers an address that failed as
        unusable, so a directory back from an outage would stay refused."""
        import ldap3

        s = self.settings
        u = urlparse(s.url)
        tls = None
        if u.scheme == "ldaps" or s.start_tls:
            tls = ldap3.Tls(
                validate=ssl.CERT_REQUIRED,
                ca_certs_file=s.ca_file or None,
                version=ssl.PROTOCOL_TLS_CLIENT,
            )
        return ldap3.Server(
            u.hostname or "",
            port=u.port,
            use_ssl=u.scheme == "ldaps",
            tls=tls,
            connect_timeout=s.timeout_s,
            get_info=ldap3.NONE,
        )

    def _connect(self, dn: str, password: str) -> Any:
        """A connection bound as ``dn``; None if the directory refused the password."""
        import ldap3

        c = ldap3.Connection(
            self._server(), user=dn, password=password,
            receive_timeout=max(1, math.ceil(self.settings.timeout_s)),
            raise_exceptions=False, read_only=True,
        )  # fmt: skip
        c.open()
        if self.settings.start_tls and not c.start_tls():
            c.unbind()
            raise DirectoryUnavailable(f"StartTLS refused: {c.result.get('description')}")
        if c.bind():
            return c
        result = c.result or {}
        c.unbind()
        if result.get("description") not in ("invalidCredentials", "inappropriateAuthentication"):
            log.warning("feed: the directory refused a bind: %s", result.get("description"))
        return None

    def _service(self) -> Any:
        s = self.settings
        c = self._connect(s.bind_dn, os.environ.get(s.bind_password_env, ""))
        if c is None:
            raise DirectoryUnavailable("the directory refused the service account (bind_dn)")
        return c

    def _find(self, svc: Any, username: str) -> str | None:
        """The DN of ``username``'s entry (None: no entry, or more than one): made from
        ``user_dn``, or searched for with the service connection ``svc``."""
        import ldap3
        from ldap3.utils.conv import escape_filter_chars
        from ldap3.utils.dn import escape_rdn

        s = self.settings
        if svc is None:
            return s.user_dn.replace("{username}", escape_rdn(username))
        flt = s.search_filter.replace("{username}", escape_filter_chars(username))
        svc.search(s.search_base, flt, ldap3.SUBTREE, attributes=[], size_limit=2)
        found = [e["dn"] for e in svc.response or [] if e.get("type") == "searchResEntry"]
        if len(found) != 1:
            log.warning("feed: the directory has %d entries for a username", len(found))
            return None
        return str(found[0])

    def _in_group(self, conn: Any, dn: str, username: str) -> bool:
        import ldap3
        from ldap3.utils.conv import escape_filter_chars

        d, u = escape_filter_chars(dn), escape_filter_chars(username)
        flt = f"(|(member={d})(uniqueMember={d})(memberUid={u}))"
        conn.search(self.settings.require_group, flt, ldap3.BASE, attributes=[])
        return any(e.get("type") == "searchResEntry" for e in conn.response or [])

    def check_password(self, username: str, password: str) -> bool:
        """Whether ``password`` is ``username``'s in the directory (and, with
        ``require_group``, the account is in the group). :class:`DirectoryUnavailable` if
        the directory could not say."""
        from ldap3.core.exceptions import LDAPException

        if not password:
            return False  # an empty password is an anonymous bind, which succeeds
        try:
            # one service connection per login, for the search and the group
            svc = self._service() if self.settings.search_base else None
            try:
                dn = self._find(svc, username)
                if dn is None:
                    return False
                conn = self._connect(dn, password)
                if conn is None:
                    return False
                try:
                    if not self.settings.require_group:
                        return True
                    # the service account reads the group where there is one
                    return self._in_group(svc or conn, dn, username)
                finally:
                    conn.unbind()
            finally:
                if svc is not None:
                    svc.unbind()
        except LDAPException as exc:
            raise DirectoryUnavailable(f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:  # TLS and sockets
            raise DirectoryUnavailable(str(exc)) from None
