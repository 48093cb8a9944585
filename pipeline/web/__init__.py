"""The live alert feed: a web page where privacy analysts see alerts arrive and triage them.

Starlette + uvicorn, Jinja2 templates, plain JavaScript (no build step). Alerts come from
the :class:`~pipeline.alerting.store.AlertStore`; new and changed ones reach open pages
within a poll interval over Server-Sent Events (:mod:`pipeline.web.changes`).

Use::

    app = create_app(store, FeedSettings.load("emrwatch.yaml"))   # any ASGI server
    url, stop = serve_feed(store, settings)        # uvicorn in a background thread
    stop.notify()                                  # optional: "I just wrote alerts"
    stop()

Pages and endpoints (roles are checked on the server for every one; 401 without a
session, 403 without the right):

=================================  ==========================================  ============
``GET /``                          the feed: filters, paging, live rows        every role
``GET /api/alerts``                one page as JSON (``items``, ``next_cursor``)  every role
``GET /cases.csv``                 the filtered cases as CSV (``cases.export``)  supervisor, auditor
``GET /events``                    Server-Sent Events (``since=``/Last-Event-ID)  every role
``GET /cases/{alert_id}``          the case (audited: ``case.view``)           every role
``POST /cases/{id}/unmask``        show patient ids for this case (``unmask``)  analyst+
``POST /cases/{id}/triage``        acknowledge, investigate, close, re-open    analyst+
``POST /cases/{id}/comment``       a note and/or (re)assignment                analyst+
``POST /cases/bulk``               acknowledge or assign several cases at once  analyst+
``GET|POST /cases/{id}/suppress``  preview, then create "suppress similar"     supervisor
``GET /cases/{id}/export``         the whole case as JSON (``case.export``)    supervisor, auditor
``GET /cases/{id}/report``         the same as a printable page (PDF)          supervisor, auditor
``GET /audit``                     the audit log                               auditor
``GET|POST /access-report``        who opened a patient's chart, and why       supervisor
                                   (audited first: ``access_report``)
``GET /access-review``             accounts and grants to re-check (audited)   supervisor
``GET /users``                     the monitor's users, how they sign in, and   supervisor, auditor
                                   their sign-ins (last, failed, lockouts)
``GET|POST /login``, ``POST /logout``
=================================  ==========================================  ============

Roles (:data:`pipeline.web.users.PERMISSIONS`): **analyst** triages, sees patient ids
masked and may unmask one case at a time, stating why; **supervisor** can do everything an
analyst can, sees patient ids, creates suppressions and runs access reports; **auditor** reads everything
masked, changes nothing, and reads the audit log. Every POST needs the session's CSRF
token (form field ``csrf_token`` or header ``X-CSRF-Token``).

Configuration: the ``feed:`` section of the YAML config file. Unknown keys are an error::

    feed:
      users:                          # who may log in (hashes: python -m pipeline.web.users hash)
        - username: li.na
          role: analyst               # analyst | supervisor | auditor
          password_hash: "$argon2id$v=19$m=65536,t=3,p=4$..."
          display_name: Li Na         # optional
          totp_secret: JBSW...        # optional second factor (base32; emrwatch users hash
                                      # --totp makes one and the authenticator's link)
        - username: wang.wei
          role: supervisor
          directory: true             # the password is the hospital account's (below)
      directory:                      # the hospital's LDAP / Active Directory
        url: ldaps://dc1.hospital.example   # or ldap://… with start_tls: true
        ca_file: /etc/emrwatch/hospital-ca.pem  # the CA of its certificate (default: system)
        user_dn: "uid={username},ou=people,dc=hospital,dc=example"  # bind as this, or:
        # search_base: "ou=staff,dc=hospital,dc=example"             # find the account
        # search_filter: "(sAMAccountName={username})"               # with this filter
        # bind_dn: "cn=svc-emrwatch,ou=services,dc=hospital,dc=example"  # as this account
        # bind_password_env: EMRWATCH_LDAP_PASSWORD                  # (its password)
        require_group: "cn=privacy-office,ou=groups,dc=hospital,dc=example"  # optional
        timeout_s: 5
      secret: ...                     # signs session cookies; prefer secret_env. Neither
      secret_env: EMRWATCH_FEED_SECRET  # set: a random one per start (sessions end on restart)
      session_max_age_s: 28800        # a login lasts 8 h
      idle_timeout_s: 0               # > 0: sign out after this long without the user's
                                      # activity (the live stream does not count)
      secure_cookies: false           # true when served over HTTPS (behind a TLS proxy)
      tls_cert_file: /etc/emrwatch/feed.pem   # serve HTTPS itself (certificate chain, PEM)
      tls_key_file: /etc/emrwatch/feed.key    # and its key; Secure cookies and HSTS follow
      page_size: 50                   # rows per page (1..500)
      poll_interval_s: 0.5            # how often the store is asked for changes
      unmask_ttl_s: 900               # an analyst's unmask of one case lasts 15 min
      login_max_failures: 5           # failed sign-ins (wrong passwords or codes) for one
      login_lockout_s: 60             # username within this many s lock it that long
      login_max_failures_per_address: 30  # failed sign-ins from one address, any users
      login_address_lockout_s: 900    # (password spraying), within this many s: locked
      trusted_proxies: []             # reverse proxies (addresses, CIDR) whose
                                      # X-Forwarded-For names the client; none: ignored
      require_totp: false             # true: every user must have a totp_secret
      title: emrwatch                 # shown in the page header
      hospital: ""                    # the name in the security assessment (default: title)
      assessment_key_file: ""         # sign the assessment JSON (Ed25519) with this private
                                      # key (emrwatch assessment-keygen) ...
      assessment_key_passphrase_env: ""  # ... encrypted with the passphrase in $NAME
      assessment_key_env: ""          # or (HMAC-SHA256) with the shared key in $NAME
      history_dir: /secure/history    # an emrwatch history export the access report reads
      history_refresh_s: 0            # > 0: emrwatch alerts keeps history_dir current
                                      # from the topics (history --update every N s)
      history_keep_days: 0            # > 0: ... keeping only the last N days (0: all)
      host: 127.0.0.1                 # where ``emrwatch run`` serves the feed
      port: 8080

The feed's URL is what ``alerting.feed_url`` should point at (links in Slack and e-mail go
to ``{feed_url}/cases/{alert_id}``).
"""

from __future__ import annotations

import importlib
from typing import Any

# imported on first use, so that ``python -m pipeline.web.users`` stays light and clean
_EXPORTS = {
    "create_app": "pipeline.web.app",
    "ChangeFeed": "pipeline.web.changes",
    "FeedServer": "pipeline.web.server",
    "serve_feed": "pipeline.web.server",
    "FeedConfigError": "pipeline.web.settings",
    "FeedSettings": "pipeline.web.settings",
    "User": "pipeline.web.settings",
    "PERMISSIONS": "pipeline.web.users",
    "ROLES": "pipeline.web.users",
    "hash_password": "pipeline.web.users",
    "verify_password": "pipeline.web.users",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.web' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
