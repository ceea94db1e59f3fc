"""Tell a human that a district's sync did not go through (pure Python, no Dagster).

Channels: a JSON webhook (Slack-compatible thanks to the ``text`` key; also fine for Teams
workflows, PagerDuty-style relays or an internal endpoint) and, optionally, plain SMTP e-mail.

Privacy: a notification carries only the fields of :class:`Notification` -- district id, state,
a short reason, run id and run URL. Callers must build ``reason`` from PII-free facts (check names,
counts, file names, sourcedIds at most), never from row values; this module additionally flattens
it to one line and caps its length so a stray traceback cannot smuggle a roster into a chat room.

Failure policy: :func:`send_webhook` / :func:`send_email` raise :class:`NotificationError`;
:func:`notify` never raises -- it returns the errors as strings, because a broken notifier must
not turn a sync result into a different failure. Error messages never contain the webhook URL's
path or query (for Slack the path *is* the secret).
"""

import json
import logging
import smtplib
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from http.client import HTTPException
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

STATES = ("failed", "held", "refused")
MAX_REASON_CHARS = 500
USER_AGENT = "capti-pipeline-notify/1"
_MAX_RETRY_AFTER_S = 30.0

_STATE_PHRASES = {
    "failed": "sync FAILED",
    "held": "sync HELD for review",
    "refused": "sync REFUSED",
}


class NotificationError(Exception):
    """A notification could not be delivered on one channel."""


@dataclass(frozen=True)
class Notification:
    """What happened to one district's sync. Contains no personal data by construction."""

    district_id: str
    state: str  # "failed" | "held" | "refused"
    reason: str
    run_id: str | None = None
    run_url: str | None = None

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {self.state!r}")
        object.__setattr__(self, "reason", _one_line(self.reason, MAX_REASON_CHARS))

    @property
    def subject(self) -> str:
        return f"[capti] District {self.district_id}: {_STATE_PHRASES[self.state]}"

    @property
    def text(self) -> str:
        """One-line human summary (the Slack ``text``)."""
        parts = [f"{self.subject} - {self.reason or 'no reason given'}"]
        if self.run_url:
            parts.append(f"(run: {self.run_url})")
        elif self.run_id:
            parts.append(f"(run id: {self.run_id})")
        return " ".join(parts)

    def to_payload(self) -> dict[str, Any]:
        return {
            "district": self.district_id,
            "state": self.state,
            "reason": self.reason,
            "run_id": self.run_id,
            "run_url": self.run_url,
            "text": self.text,
        }


@dataclass(frozen=True)
class SmtpSettings:
    """Optional e-mail channel for :func:`notify`."""

    host: str
    port: int
    sender: str
    recipients: tuple[str, ...]
    starttls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 10


def build_run_url(ui_base_url: str | None, run_id: str | None) -> str | None:
    """Link to the run in the Dagster UI, or None when either part is unknown."""
    if not ui_base_url or not run_id:
        return None
    return f"{ui_base_url.rstrip('/')}/runs/{run_id}"


# ##### WEBHOOK


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirected POST would either be replayed as an empty GET or sent to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None  # urllib then raises HTTPError for the 3xx


_opener = urllib.request.build_opener(_NoRedirects)


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}{f':{parts.port}' if parts.port else ''}/..."


def _retry_after_seconds(err: urllib.error.HTTPError) -> float | None:
    value = err.headers.get("Retry-After") if err.headers else None
    try:
        return min(float(value), _MAX_RETRY_AFTER_S) if value is not None else None
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff


def send_webhook(
    url: str,
    notification: Notification,
    *,
    timeout_s: float = 10,
    attempts: int = 3,
    backoff_s: float = 1.0,
) -> None:
    """POST the notification as JSON; retry connection errors, timeouts, 429 and 5xx.

    Waits ``backoff_s * 2**(n-1)`` after the n-th failed attempt (or the server's ``Retry-After``,
    capped at 30 s, when larger). Other 4xx and 3xx responses are permanent: no retry.
    Raises :class:`NotificationError` when the notification was not accepted.
    """
    if urlsplit(url).scheme not in ("http", "https"):
        raise NotificationError(f"webhook URL must be http(s), got {urlsplit(url).scheme!r}")
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    target = _redacted(url)
    body = json.dumps(notification.to_payload(), ensure_ascii=False).encode("utf-8")
    last_error = "no attempt made"
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(
            url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json; charset=utf-8",
                "User-Agent": USER_AGENT,
            },
        )
        wait = backoff_s * 2 ** (attempt - 1)
        try:
            with _opener.open(request, timeout=timeout_s) as response:
                response.read(64 * 1024)  # drain so the connection closes cleanly
            log.info(
                "notification for district %s delivered to %s (attempt %d)",
                notification.district_id,
                target,
                attempt,
            )
            return
        except urllib.error.HTTPError as err:
            last_error = f"HTTP {err.code} {err.reason}"
            err.close()
            if err.code != 429 and err.code < 500:
                raise NotificationError(
                    f"webhook {target} rejected the notification: {last_error}"
                ) from None
            wait = max(wait, _retry_after_seconds(err) or 0.0)
        except (urllib.error.URLError, HTTPException, OSError) as err:
            # URLError wraps refused/unreachable/DNS; timeouts surface as TimeoutError (OSError).
            reason = err.reason if isinstance(err, urllib.error.URLError) else err
            last_error = f"{type(reason).__name__}: {reason}"
        log.warning(
            "notification attempt %d/%d to %s failed: %s", attempt, attempts, target, last_error
        )
        if attempt < attempts:
            time.sleep(wait)
    raise NotificationError(f"webhook {target} failed after {attempts} attempt(s): {last_error}")


# ##### E-MAIL


def send_email(
    smtp_host: str,
    smtp_port: int,
    sender: str,
    recipients: Sequence[str],
    notification: Notification,
    timeout_s: float = 10,
    *,
    starttls: bool = False,
    username: str | None = None,
    password: str | None = None,
) -> None:
    """Send the notification as a short plain-text e-mail. No retries (SMTP servers queue)."""
    recipients = [recipients] if isinstance(recipients, str) else list(recipients)
    if not recipients:
        raise NotificationError("e-mail channel has no recipients")
    message = EmailMessage()
    message["Subject"] = notification.subject
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain="capti-pipeline")
    lines = [
        notification.text,
        "",
        f"District: {notification.district_id}",
        f"State:    {notification.state}",
        f"Reason:   {notification.reason}",
        f"Run id:   {notification.run_id or '-'}",
        f"Run:      {notification.run_url or '-'}",
    ]
    message.set_content("\n".join(lines) + "\n")
    try:
        with smtplib.SMTP(smtp_host, smtp_port, timeout=timeout_s) as smtp:
            if starttls:
                smtp.starttls()
            if username:
                smtp.login(username, password or "")
            refused = smtp.send_message(message, from_addr=sender, to_addrs=recipients)
    except (smtplib.SMTPException, OSError) as err:
        raise NotificationError(
            f"e-mail via {smtp_host}:{smtp_port} failed: {type(err).__name__}: {err}"
        ) from None
    if refused:
        raise NotificationError(f"e-mail refused for {len(refused)} recipient(s)")


# ##### ALL CHANNELS


def notify(
    notification: Notification,
    *,
    webhook_url: str | None,
    smtp: SmtpSettings | None = None,
    timeout_s: float = 10,
    attempts: int = 3,
    backoff_s: float = 1.0,
) -> list[str]:
    """Send on every configured channel; return one error string per failed channel, never raise."""
    errors: list[str] = []
    if webhook_url:
        try:
            send_webhook(
                webhook_url,
                notification,
                timeout_s=timeout_s,
                attempts=attempts,
                backoff_s=backoff_s,
            )
        except Exception as err:  # a notifier must never fail the sync
            errors.append(f"webhook: {err}")
    if smtp is not None:
        try:
            send_email(
                smtp.host,
                smtp.port,
                smtp.sender,
                list(smtp.recipients),
                notification,
                timeout_s=smtp.timeout_s,
                starttls=smtp.starttls,
                username=smtp.username,
                password=smtp.password,
            )
        except Exception as err:
            errors.append(f"email: {err}")
    if not webhook_url and smtp is None:
        log.warning(
            "no notification channel configured; district %s %s: %s",
            notification.district_id,
            notification.state,
            notification.reason,
        )
    for error in errors:
        log.error("notification for district %s not delivered: %s", notification.district_id, error)
    return errors


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
