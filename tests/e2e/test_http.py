"""Raw HTTP through tokengo: the chain must be transparent (DESIGN §6) for what it forwards.
Query strings, repeated request headers, non-JSON bodies, response status codes and response
headers survive the trip. What it forwards is limited (issue 12): the exit passes only inference
endpoints unless its operator allows more (the echo chain allows `* /echo/*`), the client
forwards only listed headers (the echo chain adds its `X-Tokengo-*` test headers), replaces
`User-Agent`, and answers only loopback hosts and origins.

Uses http.client (stdlib) so repeated header lines and raw request targets are under control."""

from __future__ import annotations

import hashlib
import http.client
import json
import urllib.parse

import pytest

from tests.e2e.conftest import Backend, Target
from tests.e2e.echo_backend import ECHO_CONTENT_TYPE


def raw_request(
    base_url: str,
    method: str,
    target: str,
    headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
    body: bytes | None = None,
) -> tuple[int, list[tuple[str, str]], bytes]:
    u = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        own_host = any(k.lower() == "host" for k, _ in headers)
        conn.putrequest(method, target, skip_host=own_host, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    finally:
        conn.close()


def field_values(headers: list[tuple[str, str]], name: str) -> list[str]:
    """All values of a field, whether sent as repeated lines or one comma-joined line
    (equivalent per RFC 9110 §5.3), in order."""
    out: list[str] = []
    for k, v in headers:
        if k.lower() == name.lower():
            out.extend(part.strip() for part in v.split(","))
    return out


def test_unknown_path_keeps_backend_status_and_body(target: Target, backend: Backend) -> None:
    # An allowed endpoint (GET /v1/models/*) that the backend answers with 404: the backend's
    # own answer comes back. (A path outside the allowed endpoints gets the exit's 403 instead.)
    path = "/v1/models/tokengo-no-such-model?probe=1"
    want_status, want_headers, want_body = raw_request(backend.url, "GET", path)
    status, headers, body = raw_request(target.url, "GET", path)
    assert want_status == 404, "the backend itself should answer 404 here"
    assert status == want_status, body[:300]
    assert field_values(headers, "content-type") == field_values(want_headers, "content-type")
    if any(v.startswith("application/json") for v in field_values(want_headers, "content-type")):
        assert json.loads(body) == json.loads(want_body)
    else:
        assert body == want_body


def test_query_string_survives(echo_target: Target) -> None:
    sent = "/echo/some/path?b=2&a=1&a=3&empty=&enc=%2F%20%C3%A9&plus=a+b"
    status, _, body = raw_request(echo_target.url, "GET", sent)
    assert status == 200, body[:300]
    assert json.loads(body)["target"] == sent


def test_repeated_request_headers_survive(echo_target: Target) -> None:
    status, _, body = raw_request(
        echo_target.url,
        "GET",
        "/echo/headers",
        [
            ("X-Tokengo-Repeat", "one"),
            ("X-Tokengo-Single", "solo"),
            ("X-Tokengo-Repeat", "two"),
        ],
    )
    assert status == 200, body[:300]
    seen = [(k, v) for k, v in json.loads(body)["headers"]]
    assert field_values(seen, "x-tokengo-repeat") == ["one", "two"], seen
    assert field_values(seen, "x-tokengo-single") == ["solo"], seen


def test_binary_body_and_content_type_survive(echo_target: Target) -> None:
    payload = bytes(range(256)) * 64  # 16 KiB, every byte value
    status, _, body = raw_request(
        echo_target.url,
        "POST",
        "/echo/upload",
        [("Content-Type", "application/octet-stream")],
        payload,
    )
    assert status == 200, body[:300]
    echoed = json.loads(body)
    assert echoed["method"] == "POST"
    assert echoed["body_len"] == len(payload)
    assert echoed["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert echoed["content_type"] == "application/octet-stream"


@pytest.mark.parametrize("code", [201, 404, 418, 503])
def test_response_status_and_headers_survive(echo_target: Target, code: int) -> None:
    status, headers, body = raw_request(echo_target.url, "GET", f"/echo/status?status={code}")
    assert status == code, body[:300]
    # The body is the backend's own answer (not an error page made up on the way).
    assert json.loads(body)["target"] == f"/echo/status?status={code}"
    assert field_values(headers, "content-type") == [ECHO_CONTENT_TYPE]
    assert field_values(headers, "x-echo-multi") == ["first", "second"], headers
    assert field_values(headers, "x-echo-single") == ["kept"], headers


def error_code(body: bytes) -> str:
    error = json.loads(body)["error"]
    assert error["message"], body
    return error["code"]


MANAGEMENT = [
    ("DELETE", "/api/delete"),
    ("POST", "/api/pull"),
    ("POST", "/api/create"),
    ("GET", "/slots"),
    ("POST", "/slots/0?action=erase"),
    ("POST", "/v1/load_lora_adapter"),
    ("GET", "/v1/files"),
    ("POST", "/v1/fine_tuning/jobs"),
]


def test_management_and_escaping_paths_are_refused(echo_chain: Target) -> None:
    for method, target in MANAGEMENT:
        status, _, body = raw_request(echo_chain.url, method, target, body=b"{}")
        assert status == 403, (method, target, body[:300])
        assert error_code(body) == "endpoint_not_allowed"
    for target in ["/echo/../../admin", "/echo/%2e%2e/%2e%2e/admin", "/echo//x", "/echo/a%2fb"]:
        status, _, body = raw_request(echo_chain.url, "POST", target, body=b"{}")
        assert status == 403, (target, body[:300])
        assert error_code(body) == "path_not_allowed"


def test_identifying_headers_are_replaced_or_dropped(echo_chain: Target) -> None:
    identifying = [
        ("User-Agent", "OpenAI/Python 1.55.0"),
        ("OpenAI-Organization", "org-e2e"),
        ("OpenAI-Project", "proj-e2e"),
        ("X-Stainless-OS", "Linux"),
        ("X-Stainless-Runtime-Version", "3.12.1"),
        ("Origin", "http://localhost:3000"),
        ("Referer", "http://localhost:3000/chat"),
        ("x-api-key", "sk-e2e"),
        ("Authorization", "Bearer sk-e2e"),
        ("Accept-Language", "de-CH"),
    ]
    status, _, body = raw_request(
        echo_chain.url,
        "POST",
        "/echo/headers",
        identifying + [("Content-Type", "application/json"), ("OpenAI-Beta", "assistants=v2")],
        b"{}",
    )
    assert status == 200, body[:300]
    seen = [(k, v) for k, v in json.loads(body)["headers"]]
    for name, _ in identifying:
        if name != "User-Agent":
            assert field_values(seen, name) == [], (name, seen)
    assert len(field_values(seen, "user-agent")) == 1
    assert field_values(seen, "user-agent")[0].startswith("tokengo/"), seen
    assert field_values(seen, "openai-beta") == ["assistants=v2"], seen


def test_foreign_host_and_origin_are_refused(echo_chain: Target) -> None:
    status, _, body = raw_request(
        echo_chain.url, "POST", "/echo/x", [("Host", "attacker.example")], b"{}"
    )
    assert status == 403, body[:300]
    assert error_code(body) == "host_not_allowed"
    status, _, body = raw_request(
        echo_chain.url, "POST", "/echo/x", [("Origin", "https://attacker.example")], b"{}"
    )
    assert status == 403, body[:300]
    assert error_code(body) == "origin_not_allowed"
