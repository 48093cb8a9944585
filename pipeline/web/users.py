"""Feed users: roles, what each role may do, and password hashes (argon2id).

Users live in the config file (``feed.users``), never in the alert database, so that the
people who triage alerts cannot grant themselves rights. A hash for the config comes from::

    python -m pipeline.web.users hash                  # prompts twice, prints the hash
    echo -n 'pw' | python -m pipeline.web.users hash --stdin --username li.na --role analyst

>>> h = hash_password("correct horse")
>>> h.startswith("$argon2id$")
True
>>> verify_password(h, "correct horse"), verify_password(h, "wrong")
(True, False)
>>> sorted(PERMISSIONS["auditor"])
['audit.read', 'case.export', 'case.read', 'feed.read', 'report.read', 'users.read']
"""

from __future__ import annotations

import argparse
import functools
import getpass
import sys
from collections.abc import Iterable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

#: what each role may do; every endpoint checks one of these server-side
PERMISSIONS: dict[str, frozenset[str]] = {
    # triage; sees masked patient ids; may unmask one case at a time, stating why
    "analyst": frozenset({"feed.read", "case.read", "triage", "unmask"}),
    # an analyst's rights, plus suppressions, and patient ids unmasked by default
    # (and exports a case's evidence for HR or legal)
    "supervisor": frozenset(
        {
            "feed.read",
            "case.read",
            "triage",
            "unmask",
            "suppress",
            "patients.see",
            "report.read",
            "case.export",
            # who opened a patient's chart, and why (pipeline.web.access): names patients
            "access.report",
            # the monitor's own users and their sign-ins (pipeline.web.accounts)
            "users.read",
            # end anyone's session (a laptop left signed in on a ward)
            "sessions.end",
        }
    ),
    # read-only and masked; reads the audit log (who looked at what) and the reports, and
    # exports a case (masked) for the compliance file
    "auditor": frozenset(
        {"feed.read", "case.read", "audit.read", "report.read", "case.export", "users.read"}
    ),
}
ROLES = tuple(PERMISSIONS)

_hasher = PasswordHasher()  # argon2id, RFC 9106 low-memory profile (argon2-cffi's default)


def hash_password(password: str) -> str:
    if not password:
        raise ValueError("an empty password cannot be used")
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return _hasher.hash("emrwatch: no such user")


def burn_verify(password: str) -> None:
    """Spend the time a real verification takes (for unknown usernames), so that timing
    does not tell which usernames exist."""
    verify_password(_dummy_hash(), password)


def allowed(role: str, permission: str) -> bool:
    return permission in PERMISSIONS.get(role, frozenset())


# ---------------------------------------------------------------------------- CLI
def add_users_arguments(parser: argparse.ArgumentParser) -> None:
    """``users hash``: for ``emrwatch users`` and ``python -m pipeline.web.users``."""
    sub = parser.add_subparsers(dest="users_command", required=True)
    h = sub.add_parser("hash", help="hash a password for feed.users in the config file")
    h.add_argument(
        "--stdin", action="store_true", help="read the password from standard input (no prompt)"
    )
    h.add_argument("--username", help="print a whole feed.users entry (YAML) for this user")
    h.add_argument("--role", choices=ROLES, default="analyst", help="role of that entry")
    h.add_argument(
        "--totp",
        action="store_true",
        help="with --username: give the user a second factor (a new TOTP secret in the "
        "entry; the otpauth:// link for their authenticator app goes to standard error)",
    )
    h.add_argument("--issuer", default="emrwatch", help="the name the authenticator shows")
    c = sub.add_parser(
        "check",
        help="check the feed's users in a config file, and try one user's sign-in (password "
        "or directory, then the authenticator's code) without starting the feed",
    )
    c.add_argument("--config", required=True, help="the YAML file with the feed: section")
    c.add_argument("--username", help="try this user's sign-in")
    c.add_argument(
        "--stdin",
        action="store_true",
        help="read the password (and on a second line the code) from standard input",
    )
    s = sub.add_parser(
        "sessions",
        help="list who is signed in to the alert feed, or end a user's sessions (e.g. a "
        "stolen laptop, when no supervisor is at hand)",
    )
    s.add_argument(
        "--config", required=True, help="the YAML file of emrwatch alerts (feed: and alerting:)"
    )
    s.add_argument("--username", help="only this user's sessions")
    s.add_argument(
        "--end",
        action="store_true",
        help="with --username: end all of them, in every feed process within a second or "
        "two (written to the audit log)",
    )


def cmd_users(args: argparse.Namespace) -> int:
    if args.users_command == "check":
        return _check(args)
    if args.users_command == "sessions":
        return _sessions(args)
    if args.users_command != "hash":  # pragma: no cover - argparse enforces the choice
        return 2
    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 1
    if not password:
        print("an empty password cannot be used", file=sys.stderr)
        return 1
    if args.totp and not args.username:
        print("--totp makes a whole feed.users entry: give --username", file=sys.stderr)
        return 1
    h = hash_password(password)
    if args.username and args.totp:
        from pipeline.web.totp import new_secret, provisioning_uri

        secret = new_secret()
        print(
            f'- {{username: {args.username}, role: {args.role}, password_hash: "{h}", '
            f"totp_secret: {secret}}}"
        )
        print(
            f"the authenticator app of {args.username} (scan it as a QR code, e.g. "
            f"qrencode -t ansiutf8 'LINK', or type the secret):\n"
            f"{provisioning_uri(secret, args.username, args.issuer)}",
            file=sys.stderr,
        )
    elif args.username:
        print(f'- {{username: {args.username}, role: {args.role}, password_hash: "{h}"}}')
    else:
        print(h)
    return 0


def _check(args: argparse.Namespace) -> int:
    """``users check``: 0 if the settings load (and the user's sign-in passes), 1 if the
    sign-in is refused, 2 if the settings are wrong or the directory cannot be reached."""
    import time

    from pipeline.web.directory import DirectoryUnavailable
    from pipeline.web.settings import FeedConfigError, FeedSettings
    from pipeline.web.totp import matching_step

    try:
        settings = FeedSettings.load(args.config)
    except (FeedConfigError, OSError) as exc:
        print(f"emrwatch users check: {exc}", file=sys.stderr)
        return 2
    for u in settings.users:
        how = "directory" if u.directory else "password hash"
        factor = "second factor (TOTP)" if u.totp_secret else "no second factor"
        print(f"{u.username:20} {u.role:11} {how:14} {factor}")
    if settings.directory is not None:
        print(f"directory: {settings.directory.url}")
    if not args.username:
        return 0
    user = settings.user(args.username)
    if user is None:
        print(f"{args.username}: not a user of the feed (not in feed.users)", file=sys.stderr)
        return 1
    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        code = sys.stdin.readline().strip()
    else:
        password = getpass.getpass(f"{user.username}'s password: ")
        code = input("authenticator code: ").strip() if user.totp_secret else ""
    try:
        ok = settings.check_password(user, password)
    except DirectoryUnavailable as exc:
        print(f"the directory cannot be reached: {exc}", file=sys.stderr)
        return 2
    if not ok:
        print(f"{user.username}: password refused", file=sys.stderr)
        return 1
    print(f"{user.username}: password accepted")
    if user.totp_secret:
        if matching_step(user.totp_secret, code, time.time()) is None:
            print(f"{user.username}: the code is not the authenticator's now", file=sys.stderr)
            return 1
        print(f"{user.username}: authenticator code accepted")
    return 0


def _sessions(args: argparse.Namespace) -> int:
    """``users sessions``: the open sessions; with ``--end``, end a user's. 0 done, 2 on
    a wrong file or an alert store that cannot be read."""
    import getpass as gp

    from sqlalchemy.exc import SQLAlchemyError

    from pipeline.alert_service import _load
    from pipeline.alerting.store import AlertStore
    from pipeline.web.sessions import ENDED_BY_SUPERVISOR, browser_label, open_sessions

    if args.end and not args.username:
        print("emrwatch users sessions: --end needs --username", file=sys.stderr)
        return 2
    try:
        _settings, alerting, feed, _ctx = _load(args.config)
    except Exception as exc:  # noqa: BLE001 - any unreadable config: say why
        print(f"emrwatch users sessions: {exc}", file=sys.stderr)
        return 2
    if feed is None:
        print(f"emrwatch users sessions: {args.config} has no feed: section", file=sys.stderr)
        return 2
    try:
        store = AlertStore(alerting.store_url, migrate=False)
        try:
            rows = open_sessions(store, feed, args.username)
            for r in rows:
                user = feed.user(r.username)
                print(f"{r.username:20} {user.role if user else '?':11} {r.address:16} "
                      f"{browser_label(r.agent):26} signed in {r.started_at:%Y-%m-%d %H:%M} "
                      f"UTC, last active {r.seen_at:%H:%M}")  # fmt: skip
            if not rows:
                print(
                    "nobody is signed in" if not args.username else f"{args.username}: no session"
                )
            if args.end:
                by = f"(command line: {gp.getuser()})"
                n = store.sessions_end_user(args.username, by, ENDED_BY_SUPERVISOR)
                if n:
                    store.record_access(
                        by, "session.end", None, {"user": args.username, "sessions": n}
                    )
                print(f"{args.username}: ended {n} session(s)")
        finally:
            store.close()
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc)
        print(f"emrwatch users sessions: cannot read the alert store: {reason}", file=sys.stderr)
        return 2
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.web.users", description=__doc__)
    add_users_arguments(p)
    return cmd_users(p.parse_args(None if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(main())
