"""capti_pipeline.lib.notify against real loopback HTTP and SMTP receivers (no mocks)."""

import email
import email.policy
import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from capti_pipeline.lib.notify import (
    MAX_REASON_CHARS,
    Notification,
    NotificationError,
    SmtpSettings,
    build_run_url,
    notify,
    send_email,
    send_webhook,
)

SECRET_PATH = "/services/T000/B000/sEcReT-token-do-not-log"
FAST = {"timeout_s": 2.0, "backoff_s": 0.01}


def _notification(**overrides: object) -> Notification:
    values: dict[str, object] = {
        "district_id": "district-042",
        "state": "held",
        "reason": "deactivation guard: 412 of 3,100 users (13%) would be archived; limit 10%",
        "run_id": "0b7c8a3e-1111-2222-3333-444455556666",
        "run_url": "https://dagster.example.org/runs/0b7c8a3e-1111-2222-3333-444455556666",
    }
    values.update(overrides)
    return Notification(**values)  # type: ignore[arg-type]


# ##### FIXTURES: loopback HTTP receiver


@dataclass
class Reply:
    status: int = 200
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class WebhookReceiver:
    """Records every request and answers with the scripted replies (then 200 forever)."""

    def __init__(self) -> None:
        self.requests: list[ReceivedRequest] = []
        self.replies: list[Reply] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.requests.append(
                        ReceivedRequest("POST", self.path, dict(self.headers.items()), body)
                    )
                    reply = receiver.replies.pop(0) if receiver.replies else Reply()
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                payload = b"ok" if reply.status < 300 else b"nope"
                self.send_response(reply.status)
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except OSError:
                    pass  # the client gave up (timeout test)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}{SECRET_PATH}"


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    rec = WebhookReceiver()
    rec.thread.start()
    try:
        yield rec
    finally:
        rec.server.shutdown()
        rec.server.server_close()


@pytest.fixture
def closed_port() -> int:
    """A loopback port with nothing listening (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ##### FIXTURES: minimal loopback SMTP responder (aiosmtpd is not a dependency)


@dataclass
class SmtpReceived:
    mail_from: str
    rcpt_to: list[str]
    message: EmailMessage


class SmtpResponder(socketserver.ThreadingTCPServer):
    """Just enough RFC 5321 for smtplib: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.received: list[SmtpReceived] = []
        self.refuse_rcpt: set[str] = set()
        super().__init__(("127.0.0.1", 0), _SmtpHandler)


class _SmtpHandler(socketserver.StreamRequestHandler):
    server: SmtpResponder

    def _reply(self, line: str) -> None:
        self.wfile.write(line.encode("ascii") + b"\r\n")

    def handle(self) -> None:
        self._reply("220 localhost capti test SMTP")
        mail_from, rcpt_to = "", []
        while line := self.rfile.readline():
            verb, _, arg = line.decode("ascii", "replace").rstrip("\r\n").partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                self._reply("250-localhost")
                self._reply("250 8BITMIME")
            elif verb in ("HELO", "NOOP"):
                self._reply("250 OK")
            elif verb == "RSET":
                mail_from, rcpt_to = "", []
                self._reply("250 OK")
            elif verb == "MAIL":
                mail_from = arg.split(":", 1)[1].strip().strip("<>")
                self._reply("250 OK")
            elif verb == "RCPT":
                address = arg.split(":", 1)[1].strip().strip("<>")
                if address in self.server.refuse_rcpt:
                    self._reply("550 no such user")
                else:
                    rcpt_to.append(address)
                    self._reply("250 OK")
            elif verb == "DATA":
                self._reply("354 end with <CRLF>.<CRLF>")
                chunks = []
                while (data := self.rfile.readline()) not in (b".\r\n", b""):
                    chunks.append(data[1:] if data.startswith(b"..") else data)
                message = email.message_from_bytes(b"".join(chunks), policy=email.policy.default)
                self.server.received.append(SmtpReceived(mail_from, rcpt_to, message))  # type: ignore[arg-type]
                self._reply("250 queued")
            elif verb == "QUIT":
                self._reply("221 bye")
                return
            else:
                self._reply("502 not implemented")


@pytest.fixture
def smtp_server() -> Iterator[SmtpResponder]:
    server = SmtpResponder()
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# ##### PURE PARTS


@pytest.mark.parametrize(
    ("base", "run_id", "expected"),
    [
        ("https://dagster.example.org", "abc", "https://dagster.example.org/runs/abc"),
        ("https://dagster.example.org/", "abc", "https://dagster.example.org/runs/abc"),
        ("http://host:3000/prefix", "r1", "http://host:3000/prefix/runs/r1"),
        (None, "abc", None),
        ("https://dagster.example.org", None, None),
        ("", "abc", None),
    ],
)
def test_build_run_url(base: str | None, run_id: str | None, expected: str | None) -> None:
    assert build_run_url(base, run_id) == expected


def test_notification_rejects_unknown_state() -> None:
    with pytest.raises(ValueError, match="state must be one of"):
        _notification(state="succeeded")


def test_reason_is_flattened_to_one_capped_line() -> None:
    note = _notification(reason="line one\nline two\t\ttabbed  " + "x" * 2000)
    assert "\n" not in note.reason
    assert note.reason.startswith("line one line two tabbed x")
    assert len(note.reason) == MAX_REASON_CHARS
    assert "\n" not in note.text


def test_payload_has_exactly_the_notification_fields() -> None:
    payload = _notification().to_payload()
    assert set(payload) == {"district", "state", "reason", "run_id", "run_url", "text"}
    assert payload["text"] == (
        "[capti] District district-042: sync HELD for review - deactivation guard: 412 of 3,100 "
        "users (13%) would be archived; limit 10% "
        "(run: https://dagster.example.org/runs/0b7c8a3e-1111-2222-3333-444455556666)"
    )


def test_text_falls_back_to_run_id_without_url() -> None:
    note = _notification(state="failed", run_url=None, reason="")
    assert note.text == (
        "[capti] District district-042: sync FAILED - no reason given "
        "(run id: 0b7c8a3e-1111-2222-3333-444455556666)"
    )


# ##### WEBHOOK


def test_webhook_posts_slack_compatible_json(receiver: WebhookReceiver) -> None:
    note = _notification()
    send_webhook(receiver.url, note, **FAST)

    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    assert request.method == "POST"
    assert request.path == SECRET_PATH
    assert request.headers["Content-Type"] == "application/json; charset=utf-8"
    assert request.headers["User-Agent"].startswith("capti-pipeline-notify/")
    assert json.loads(request.body) == {
        "district": "district-042",
        "state": "held",
        "reason": note.reason,
        "run_id": note.run_id,
        "run_url": note.run_url,
        "text": note.text,
    }


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_webhook_retries_transient_errors_then_delivers(
    receiver: WebhookReceiver, status: int
) -> None:
    receiver.replies = [Reply(status), Reply(status), Reply(200)]
    send_webhook(receiver.url, _notification(), attempts=3, **FAST)
    assert len(receiver.requests) == 3
    assert len({r.body for r in receiver.requests}) == 1  # same payload every attempt


def test_webhook_backs_off_between_attempts(receiver: WebhookReceiver) -> None:
    receiver.replies = [Reply(500), Reply(500), Reply(200)]
    started = time.monotonic()
    send_webhook(receiver.url, _notification(), attempts=3, timeout_s=2, backoff_s=0.1)
    assert time.monotonic() - started >= 0.1 + 0.2  # 0.1 s, then 0.2 s


def test_webhook_raises_after_last_attempt(receiver: WebhookReceiver) -> None:
    receiver.replies = [Reply(503)] * 3
    with pytest.raises(NotificationError, match=r"after 3 attempt\(s\): HTTP 503") as info:
        send_webhook(receiver.url, _notification(), attempts=3, **FAST)
    assert len(receiver.requests) == 3
    assert "sEcReT" not in str(info.value)


@pytest.mark.parametrize("status", [400, 403, 404])
def test_webhook_does_not_retry_client_errors(receiver: WebhookReceiver, status: int) -> None:
    receiver.replies = [Reply(status)]
    with pytest.raises(NotificationError, match=f"HTTP {status}"):
        send_webhook(receiver.url, _notification(), attempts=3, **FAST)
    assert len(receiver.requests) == 1


def test_webhook_does_not_follow_redirects(receiver: WebhookReceiver) -> None:
    receiver.replies = [Reply(302, headers={"Location": "/elsewhere"})]
    with pytest.raises(NotificationError, match="HTTP 302"):
        send_webhook(receiver.url, _notification(), **FAST)
    assert [r.path for r in receiver.requests] == [SECRET_PATH]


def test_webhook_receiver_down_raises_without_leaking_the_url(closed_port: int) -> None:
    url = f"http://127.0.0.1:{closed_port}{SECRET_PATH}"
    with pytest.raises(NotificationError, match="after 2 attempt") as info:
        send_webhook(url, _notification(), attempts=2, **FAST)
    message = str(info.value)
    assert f"127.0.0.1:{closed_port}" in message
    assert "sEcReT" not in message
    assert "ConnectionRefusedError" in message


def test_webhook_times_out_and_retries(receiver: WebhookReceiver) -> None:
    receiver.replies = [Reply(200, delay_s=1.0), Reply(200, delay_s=1.0)]
    with pytest.raises(NotificationError, match=r"(?i)timed? ?out"):
        send_webhook(receiver.url, _notification(), attempts=2, timeout_s=0.2, backoff_s=0.01)
    assert len(receiver.requests) == 2


def test_webhook_rejects_non_http_urls() -> None:
    with pytest.raises(NotificationError, match="must be http"):
        send_webhook("file:///etc/passwd", _notification(), **FAST)


# ##### E-MAIL


def test_email_is_delivered(smtp_server: SmtpResponder) -> None:
    note = _notification(state="refused", reason="package incomplete: users.csv missing")
    port = smtp_server.server_address[1]
    send_email("127.0.0.1", port, "capti@example.org", ["ops@example.org", "it@example.org"], note)

    assert len(smtp_server.received) == 1
    got = smtp_server.received[0]
    assert got.mail_from == "capti@example.org"
    assert got.rcpt_to == ["ops@example.org", "it@example.org"]
    assert got.message["Subject"] == "[capti] District district-042: sync REFUSED"
    assert got.message["To"] == "ops@example.org, it@example.org"
    body = got.message.get_content()
    assert note.text in body
    assert "Reason:   package incomplete: users.csv missing" in body
    assert f"Run:      {note.run_url}" in body


def test_email_server_down_raises(closed_port: int) -> None:
    with pytest.raises(NotificationError, match=f"127.0.0.1:{closed_port} failed"):
        send_email("127.0.0.1", closed_port, "a@example.org", ["b@example.org"], _notification())


def test_email_all_recipients_refused_raises(smtp_server: SmtpResponder) -> None:
    smtp_server.refuse_rcpt = {"gone@example.org"}
    port = smtp_server.server_address[1]
    with pytest.raises(NotificationError, match="SMTPRecipientsRefused"):
        send_email("127.0.0.1", port, "a@example.org", ["gone@example.org"], _notification())


# ##### notify(): every channel, never raises


def test_notify_sends_on_every_channel(
    receiver: WebhookReceiver, smtp_server: SmtpResponder
) -> None:
    smtp = SmtpSettings(
        host="127.0.0.1",
        port=smtp_server.server_address[1],
        sender="capti@example.org",
        recipients=("ops@example.org",),
    )
    assert notify(_notification(), webhook_url=receiver.url, smtp=smtp, **FAST) == []
    assert len(receiver.requests) == 1
    assert len(smtp_server.received) == 1


def test_notify_returns_errors_instead_of_raising(
    closed_port: int, smtp_server: SmtpResponder
) -> None:
    smtp = SmtpSettings(
        host="127.0.0.1",
        port=closed_port,
        sender="capti@example.org",
        recipients=("ops@example.org",),
        password="hunter2",
    )
    errors = notify(
        _notification(),
        webhook_url=f"http://127.0.0.1:{closed_port}{SECRET_PATH}",
        smtp=smtp,
        attempts=2,
        **FAST,
    )
    assert len(errors) == 2
    assert errors[0].startswith("webhook: ")
    assert errors[1].startswith("email: ")
    assert not any("sEcReT" in e or "hunter2" in e for e in errors)
    assert "hunter2" not in repr(smtp)


def test_notify_one_channel_failing_does_not_stop_the_other(
    closed_port: int, smtp_server: SmtpResponder
) -> None:
    smtp = SmtpSettings(
        host="127.0.0.1",
        port=smtp_server.server_address[1],
        sender="capti@example.org",
        recipients=("ops@example.org",),
    )
    errors = notify(
        _notification(), webhook_url=f"http://127.0.0.1:{closed_port}/hook", smtp=smtp, **FAST
    )
    assert [e.split(":")[0] for e in errors] == ["webhook"]
    assert len(smtp_server.received) == 1


def test_notify_without_channels_is_a_no_op() -> None:
    assert notify(_notification(), webhook_url=None) == []
