"""Webhook verification and parsing, on every delivery kept in tests/fixtures/webhooks (real ones)
and tests/fixtures/webhooks-extra (forms and headers written from the providers' documentation)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import random
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.sources.webhooks.verify import (
    PayloadError,
    PushEvent,
    SignatureError,
    WebhookError,
    parse,
    verify,
    verify_and_parse,
)

# Real deliveries, byte for byte as the providers send them (copied from the shared set;
# tests/fixtures/webhooks/README.md gives their sources and how each provider signs).
SHARED = Path(__file__).resolve().parents[1] / "fixtures" / "webhooks"
# Form and release variants the shared set lacks, written from the providers' documented formats
# (tests/fixtures/webhooks-extra/README.md); named "extra/PROVIDER/FILE" below.
EXTRA = SHARED.with_name("webhooks-extra")
pytestmark = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"shared webhook deliveries not found at {SHARED}"
)
FORM = "application/x-www-form-urlencoded"

SECRET = "s3cr3t-for-tests"
ZERO = "0" * 40


def on_disk() -> list[str]:
    """Every delivery file of both directories, as names `body_of` reads."""
    names = [
        f"{p.parent.name}/{p.name}" for p in SHARED.glob("*/*") if p.suffix in (".json", ".txt")
    ]
    names += [
        f"extra/{p.parent.name}/{p.name}"
        for p in EXTRA.glob("*/*")
        if p.suffix in (".json", ".txt")
    ]
    return sorted(names)


def body_of(name: str) -> bytes:
    """The delivery's exact bytes, never re-serialised."""
    if name.startswith("extra/"):
        return (EXTRA / name.removeprefix("extra/")).read_bytes()
    return (SHARED / name).read_bytes()


def is_form(name: str) -> bool:
    """`.txt` files are `application/x-www-form-urlencoded` bodies (`payload=<JSON>`)."""
    return name.endswith(".txt")


def json_of(name: str) -> bytes:
    """The delivery's JSON: the file, or its form's `payload` field (read independently of the
    code under test)."""
    body = body_of(name)
    if not is_form(name):
        return body
    [payload] = urllib.parse.parse_qs(body.decode("ascii"), strict_parsing=True)["payload"]
    return payload.encode()


def form_of(data: bytes) -> bytes:
    """JSON bytes as a form body, encoded as Gitea (Go's url.Values.Encode) does."""
    return b"payload=" + urllib.parse.quote_plus(data, safe="").encode()


def hex256(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def hex1(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


# Header sets as each provider sends them (README tables), signed over the given body.
def github_headers(event: str, body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/044aadd",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "X-GitHub-Hook-ID": "292430182",
        "X-Hub-Signature": "sha1=" + hex1(body, secret),
        "X-Hub-Signature-256": "sha256=" + hex256(body, secret),
    }


def gitlab_headers(event: str, token: str = SECRET) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": "GitLab/17.0.0",
        "X-Gitlab-Event": event,
        "X-Gitlab-Token": token,
        "X-Gitlab-Event-UUID": "13792a34-cac6-4fda-95a8-c58e00a3954e",
        "X-Gitlab-Webhook-UUID": "7b5a6f2e-ffa1-4c6a-9d6b-7cf2c8a4d81e",
        "X-Gitlab-Instance": "https://gitlab.example.com",
    }


def gitea_headers(body: bytes, secret: str = SECRET, event: str = "push") -> dict[str, str]:
    sig = hex256(body, secret)
    return {
        "Content-Type": "application/json",
        "X-Gitea-Event": event,
        "X-Gitea-Event-Type": event,
        "X-Gogs-Event": event,
        "X-GitHub-Event": event,
        "X-Gitea-Delivery": "f6266f16-1bf3-46a5-9ea4-602e06ead473",
        "X-Gogs-Delivery": "f6266f16-1bf3-46a5-9ea4-602e06ead473",
        "X-GitHub-Delivery": "f6266f16-1bf3-46a5-9ea4-602e06ead473",
        "X-Gitea-Signature": sig,
        "X-Gogs-Signature": sig,
        "X-Hub-Signature": "sha1=" + hex1(body, secret),
        "X-Hub-Signature-256": "sha256=" + sig,
    }


def forgejo_headers(body: bytes, secret: str = SECRET, event: str = "push") -> dict[str, str]:
    headers = gitea_headers(body, secret, event)
    headers.update(
        {
            "X-Forgejo-Event": event,
            "X-Forgejo-Event-Type": event,
            "X-Forgejo-Delivery": "0b9f1e5c-6b2e-4a47-bb85-1d0f0e7d2c11",
            "X-Forgejo-Signature": headers["X-Gitea-Signature"],
        }
    )
    return headers


def bb_cloud_headers(body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": "Bitbucket-Webhooks/2.0",
        "X-Event-Key": "repo:push",
        "X-Hook-UUID": "0ed7f5d6-2cb8-4e25-8f0b-0a1b7f6c2a55",
        "X-Request-UUID": "5b2d0e2c-1d3c-4c5e-9f3b-6a1e2d3c4b5a",
        "X-Attempt-Number": "1",
        "X-Hub-Signature": "sha256=" + hex256(body, secret),
    }


def bb_server_headers(body: bytes, event: str, secret: str = SECRET) -> dict[str, str]:
    return {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": "Atlassian HttpClient 4.0.0 / Bitbucket-8.19.0 (8019000) / Default",
        "X-Event-Key": event,
        "X-Request-Id": "a9c8f5d4-3b2e-41f0-9d8c-7b6a5e4d3c2b",
        "X-Hub-Signature": "sha256=" + hex256(body, secret),
    }


def _event_of(file: str, events: dict[str, str], default: str) -> str:
    return next((event for prefix, event in events.items() if file.startswith(prefix)), default)


def headers_for(name: str, secret: str = SECRET) -> dict[str, str]:
    """The header set the provider would send with that file (the event told by the file's
    name, as the fixtures' READMEs list them), signed with `secret` over what the provider
    signs: the body as sent, but a Gitea or Forgejo form over the JSON inside it."""
    provider, file = name.removeprefix("extra/").split("/")
    body = body_of(name)
    headers: dict[str, str]
    if provider == "github":
        event = _event_of(
            file,
            {"ping": "ping", "release": "release", "create": "create", "delete.": "delete"},
            "push",
        )
        headers = github_headers(event, body, secret)
    elif provider == "gitlab":
        event = _event_of(
            file,
            {"tag-push": "Tag Push Hook", "release": "Release Hook", "system-hook": "System Hook"},
            "Push Hook",
        )
        headers = gitlab_headers(event, secret)
    elif provider in ("gitea", "forgejo"):
        event = _event_of(file, {"release": "release", "create": "create"}, "push")
        make = gitea_headers if provider == "gitea" else forgejo_headers
        headers = make(json_of(name), secret, event)
    elif provider == "bitbucket-cloud":
        headers = bb_cloud_headers(body, secret)
    else:
        event = "diagnostics:ping" if file == "ping.json" else "repo:refs_changed"
        headers = bb_server_headers(body, event, secret)
    if is_form(name):
        headers["Content-Type"] = FORM
    return headers


# name: (kind, ref, before, after, deleted, the repository's first name: its full name or path).
# Values as the fixtures' READMEs give them: e.g. Bitbucket Data Center's annotated tag gives
# the commit (toCommit.id), not the tag object (toHash); releases of GitHub and Gitea no SHA.
Expected = tuple[str, str | None, str | None, str | None, bool, str | None]
EXPECTED: dict[str, Expected] = {
    "bitbucket-cloud/push-annotated-tag.json": (
        "tag",
        "refs/tags/test-tag",
        None,
        "7ef5981d59145c3ed300b1ab77b93907d33abe59",
        False,
        "example-user/test-repos",
    ),
    "bitbucket-cloud/push-delete-branch.json": (
        "ignored",
        "refs/heads/feature/test",
        "174561d625c9623b60d8aba09b7f08ddc9df45cd",
        None,
        True,
        "example-user/test-repos",
    ),
    "bitbucket-cloud/push-delete-tag.json": (
        "ignored",
        "refs/tags/test",
        "174561d625c9623b60d8aba09b7f08ddc9df45cd",
        None,
        True,
        "example-user/test-repos",
    ),
    "bitbucket-cloud/push-new-branch.json": (
        "push",
        "refs/heads/feature/test",
        None,
        "174561d625c9623b60d8aba09b7f08ddc9df45cd",
        False,
        "example-user/test-repos",
    ),
    "bitbucket-cloud/push-signed.json": (
        "push",
        "refs/heads/feature/webhook",
        None,
        "d7f300a32270053bdfd97a6d64113f58202c33e7",
        False,
        "example-dev/test-repos",
    ),
    "bitbucket-cloud/push-tag.json": (
        "tag",
        "refs/tags/simple-tag",
        None,
        "7ef5981d59145c3ed300b1ab77b93907d33abe59",
        False,
        "example-user/test-repos",
    ),
    "bitbucket-cloud/push.json": (
        "push",
        "refs/heads/feature/issue-819",
        "a10199272451f4c7c5edced2d40b5d6f2f6f5fa3",
        "5ecffa3874e96920f24a2b3c0d0038e47d5cd1a4",
        False,
        "example-user/test-repos",
    ),
    "bitbucket-server/ping.json": (
        "ping",
        None,
        None,
        None,
        False,
        None,
    ),
    "bitbucket-server/push-annotated-tag.json": (
        "tag",
        "refs/tags/annotated-tag",
        None,
        "fb522a6f08c7c7df337312e4e65ec1b57710672e",
        False,
        "EXAMPLE/test-repos",
    ),
    "bitbucket-server/push-delete-branch.json": (
        "ignored",
        "refs/heads/feature/BB-1",
        "fb522a6f08c7c7df337312e4e65ec1b57710672e",
        None,
        True,
        "EXAMPLE/test-repos",
    ),
    "bitbucket-server/push-delete-tag.json": (
        "ignored",
        "refs/tags/simple-tag",
        "fb522a6f08c7c7df337312e4e65ec1b57710672e",
        None,
        True,
        "EXAMPLE/test-repos",
    ),
    "bitbucket-server/push-new-branch.json": (
        "push",
        "refs/heads/feature/BB-1",
        None,
        "fb522a6f08c7c7df337312e4e65ec1b57710672e",
        False,
        "EXAMPLE/test-repos",
    ),
    "bitbucket-server/push-signed.json": (
        "ignored",
        "refs/heads/feature/BB-1",
        "fb522a6f08c7c7df337312e4e65ec1b57710672e",
        None,
        True,
        "EXAMPLE/test-repos",
    ),
    "bitbucket-server/push-tag.json": (
        "tag",
        "refs/tags/simple-tag",
        None,
        "fb522a6f08c7c7df337312e4e65ec1b57710672e",
        False,
        "EXAMPLE/test-repos",
    ),
    "bitbucket-server/push.json": (
        "push",
        "refs/heads/main",
        "a8c13e8850dc60300be720019d1ffc1aa2fded87",
        "9fdd7b96d3f5c276d0b9e0bf38c879eb112d889a",
        False,
        "EXAMPLE/test-repos",
    ),
    "extra/forgejo/release-published.json": (
        "tag",
        "refs/tags/0.0.5",
        None,
        None,
        False,
        "example-maintainer/demo",
    ),
    "extra/gitea/push-form.txt": (
        "push",
        "refs/heads/develop",
        "28e1879d029cb852e4844d9c718537df08844e03",
        "bffeb74224043ba2feb48d137756c8a9331c449a",
        False,
        "gitea/webhooks",
    ),
    "extra/gitea/release-published-form.txt": (
        "tag",
        "refs/tags/0.0.5",
        None,
        None,
        False,
        "example-maintainer/demo",
    ),
    "extra/github/ping-form.txt": (
        "ping",
        None,
        None,
        None,
        False,
        "Octocoders/Hello-World",
    ),
    "extra/github/release-published-form.txt": (
        "tag",
        "refs/tags/0.0.1",
        None,
        None,
        False,
        "Codertocat/Hello-World",
    ),
    "forgejo/push.json": (
        "push",
        "refs/heads/develop",
        "28e1879d029cb852e4844d9c718537df08844e03",
        "bffeb74224043ba2feb48d137756c8a9331c449a",
        False,
        "forgejo/webhooks",
    ),
    "gitea/create-branch.json": (
        "ignored",
        None,
        None,
        None,
        False,
        "example/example",
    ),
    "gitea/push-new-branch.json": (
        "push",
        "refs/heads/master",
        None,
        "67b56589a45103f891bdee7c0546e5d40bc02001",
        False,
        "example/example",
    ),
    "gitea/push.json": (
        "push",
        "refs/heads/develop",
        "28e1879d029cb852e4844d9c718537df08844e03",
        "bffeb74224043ba2feb48d137756c8a9331c449a",
        False,
        "gitea/webhooks",
    ),
    "gitea/release-published.json": (
        "tag",
        "refs/tags/0.0.5",
        None,
        None,
        False,
        "example-maintainer/demo",
    ),
    "github/create.json": (
        "ignored",
        None,
        None,
        None,
        False,
        "Codertocat/Hello-World",
    ),
    "github/delete.json": (
        "ignored",
        None,
        None,
        None,
        False,
        "Codertocat/Hello-World",
    ),
    "github/ping.json": (
        "ping",
        None,
        None,
        None,
        False,
        "Octocoders/Hello-World",
    ),
    "github/push-delete-branch.json": (
        "ignored",
        "refs/heads/feature-branch",
        "d2b75aa7797ec26b088fa2dd527e9d2c052fcedd",
        None,
        True,
        "example-author/drone-test-go",
    ),
    "github/push-delete-tag.json": (
        "ignored",
        "refs/tags/simple-tag",
        "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
        None,
        True,
        "Codertocat/Hello-World",
    ),
    "github/push-form-from-push-json.txt": (
        "push",
        "refs/heads/changes",
        "9049f1265b7d61be4a8904a9a27120d2064dab3b",
        "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c",
        False,
        "baxterthehacker/public-repo",
    ),
    "github/push-form.txt": (
        "push",
        "refs/heads/master",
        "8909e1e0182dd2563c024a699b4fca456c0f5195",
        "009a12040858af96a17cb12695bb363d55891eda",
        False,
        "example-org/shop",
    ),
    "github/push-new-branch.json": (
        "push",
        "refs/heads/master",
        None,
        "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
        False,
        "Codertocat/Hello-World",
    ),
    "github/push-organization.json": (
        "push",
        "refs/heads/example-owner-patch-1",
        "d8e0d9260e58f7882394751ce1895378c3b3750d",
        "32c457ac10563a7d2913916625db5526cde7b771",
        False,
        "agoda-com/samsahai-example",
    ),
    "github/push-tag.json": (
        "tag",
        "refs/tags/simple-tag",
        None,
        "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
        False,
        "Codertocat/Hello-World",
    ),
    "github/push.json": (
        "push",
        "refs/heads/changes",
        "9049f1265b7d61be4a8904a9a27120d2064dab3b",
        "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c",
        False,
        "baxterthehacker/public-repo",
    ),
    "github/release-published.json": (
        "tag",
        "refs/tags/0.0.1",
        None,
        None,
        False,
        "Codertocat/Hello-World",
    ),
    "gitlab/push-delete-branch.json": (
        "ignored",
        "refs/heads/feature",
        "c4c79227ed610f1151f05bbc5be33b4f340d39c8",
        None,
        True,
        "gitlab-org/hello-world",
    ),
    "gitlab/push-new-branch.json": (
        "push",
        "refs/heads/feature",
        None,
        "c4c79227ed610f1151f05bbc5be33b4f340d39c8",
        False,
        "gitlab-org/hello-world",
    ),
    "gitlab/push.json": (
        "push",
        "refs/heads/master",
        "95790bf891e76fee5e1747ab589903a6a1f80f22",
        "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
        False,
        "mike/diaspora",
    ),
    "gitlab/release-hook.json": (
        "tag",
        "refs/tags/1.0.0",
        None,
        "2626dbdb936782b5c54816b1c6d45b1279303c6d",
        False,
        "exm-namespace/example-project",
    ),
    "gitlab/system-hook-push.json": (
        "push",
        "refs/heads/master",
        "95790bf891e76fee5e1747ab589903a6a1f80f22",
        "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
        False,
        "mike/diaspora",
    ),
    "gitlab/tag-push-hook.json": (
        "tag",
        "refs/tags/v1.0.0",
        None,
        "82b3d5ae55f7080f1e6022629cdb57bfae7cccc7",
        False,
        "jsmith/example",
    ),
}

DELIVERY_IDS = {
    "github": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
    "gitlab": "13792a34-cac6-4fda-95a8-c58e00a3954e",
    "gitea": "f6266f16-1bf3-46a5-9ea4-602e06ead473",
    "forgejo": "0b9f1e5c-6b2e-4a47-bb85-1d0f0e7d2c11",
    "bitbucket-cloud": "5b2d0e2c-1d3c-4c5e-9f3b-6a1e2d3c4b5a",
    "bitbucket-server": "a9c8f5d4-3b2e-41f0-9d8c-7b6a5e4d3c2b",
}

# Every file of both directories, read from disk: a file added there is tested by every
# parametrized test below (and fails the table test until its expectation is written).
NAMES = on_disk()
# GitLab authenticates with a token, not a body signature: handled in its own tests.
SIGNED_NAMES = [n for n in NAMES if not n.startswith("gitlab/")]


def test_every_file_has_an_expectation() -> None:
    """Each delivery in both directories is covered by the table, and the table names no file
    that is gone, so none goes untested."""
    assert set(NAMES) == set(EXPECTED)


@pytest.mark.parametrize("name", NAMES)
def test_real_delivery_parses_to_expected_event(name: str) -> None:
    """A delivery, signed and verified, gives the kind, ref, SHAs, delivery id and repository
    name it holds; a release event is marked as one."""
    assert name in EXPECTED, f"{name}: add its expected event to EXPECTED"
    kind, ref, before, after, deleted, repository = EXPECTED[name]
    provider = name.removeprefix("extra/").split("/")[0]
    events = verify_and_parse(headers_for(name), body_of(name), SECRET)
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, PushEvent)
    assert (event.provider, event.kind, event.ref, event.before, event.after) == (
        provider,
        kind,
        ref,
        before,
        after,
    )
    assert event.deleted is deleted
    assert event.delivery_id == DELIVERY_IDS[provider]
    assert (event.repository[:1] or (None,))[0] == repository
    assert event.release is ("release" in name and kind == "tag")
    if kind in ("ignored", "ping"):
        assert event.reason


@pytest.mark.parametrize("name", SIGNED_NAMES)
def test_one_changed_byte_fails_signature(name: str) -> None:
    """Changing one byte of the body after signing makes verification fail."""
    body = bytearray(body_of(name))
    body[len(body) // 2] ^= 0x01
    with pytest.raises(SignatureError) as err:
        verify(headers_for(name), bytes(body), SECRET)
    assert err.value.status == 401
    assert "signature does not match" in str(err.value)


@pytest.mark.parametrize("name", SIGNED_NAMES)
def test_wrong_secret_fails_signature(name: str) -> None:
    """A delivery signed with another secret is refused, naming the signature header."""
    with pytest.raises(SignatureError) as err:
        verify(headers_for(name, secret="another-secret"), body_of(name), SECRET)
    assert err.value.header is not None
    assert str(err.value).startswith(err.value.header + ":")


@pytest.mark.parametrize(
    ("name", "removed", "named"),
    [
        ("github/push.json", ("X-Hub-Signature-256",), "X-Hub-Signature-256"),
        (
            "gitea/push.json",
            ("X-Gitea-Signature", "X-Hub-Signature-256"),
            "X-Gitea-Signature",
        ),
        (
            "forgejo/push.json",
            ("X-Forgejo-Signature", "X-Gitea-Signature", "X-Hub-Signature-256"),
            "X-Forgejo-Signature",
        ),
        ("bitbucket-cloud/push.json", ("X-Hub-Signature",), "X-Hub-Signature"),
        ("bitbucket-server/push.json", ("X-Hub-Signature",), "X-Hub-Signature"),
        ("gitlab/push.json", ("X-Gitlab-Token",), "X-Gitlab-Token"),
    ],
)
def test_missing_signature_names_expected_header(
    name: str, removed: tuple[str, ...], named: str
) -> None:
    """With a secret configured, an unsigned delivery is refused, naming the expected header."""
    headers = {k: v for k, v in headers_for(name).items() if k not in removed}
    with pytest.raises(SignatureError) as err:
        verify(headers, body_of(name), SECRET)
    assert str(err.value).startswith("missing signature: expected one of ")
    assert named in str(err.value)
    assert err.value.header == named


@pytest.mark.parametrize("name", NAMES)
def test_no_secret_accepts_unsigned(name: str) -> None:
    """With no secret configured, a delivery without any signature header is accepted."""
    signature_headers = {
        "x-hub-signature",
        "x-hub-signature-256",
        "x-gitea-signature",
        "x-gogs-signature",
        "x-forgejo-signature",
        "x-gitlab-token",
    }
    headers = {k: v for k, v in headers_for(name).items() if k.lower() not in signature_headers}
    assert verify_and_parse(headers, body_of(name), None)


def test_github_sha1_signature_alone_is_not_enough() -> None:
    """GitHub's legacy SHA-1 X-Hub-Signature does not stand in for X-Hub-Signature-256."""
    headers = headers_for("github/push.json")
    del headers["X-Hub-Signature-256"]
    with pytest.raises(SignatureError, match="X-Hub-Signature-256"):
        verify(headers, body_of("github/push.json"), SECRET)


def test_headers_are_case_insensitive() -> None:
    """Header names are matched whatever their capitalisation (HTTP/2 sends them lowercase)."""
    name = "github/push.json"
    headers = {k.lower(): v for k, v in headers_for(name).items()}
    events = verify_and_parse(headers, body_of(name), SECRET)
    assert events[0].after == "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("bitbucket")])
def test_bitbucket_x_hub_signature_is_sha256(name: str) -> None:
    """Bitbucket's X-Hub-Signature carries HMAC-SHA256; a SHA-1 value there is refused."""
    body = body_of(name)
    headers = headers_for(name)
    assert headers["X-Hub-Signature"] == "sha256=" + hex256(body)
    verify(headers, body, SECRET)
    headers["X-Hub-Signature"] = "sha256=" + hex1(body)
    with pytest.raises(SignatureError, match="X-Hub-Signature: signature does not match"):
        verify(headers, body, SECRET)
    headers["X-Hub-Signature"] = "sha1=" + hex1(body)
    with pytest.raises(SignatureError, match="X-Hub-Signature: expected 'sha256="):
        verify(headers, body, SECRET)


def test_gitea_empty_signature_headers_count_as_missing() -> None:
    """Gitea without a secret sends empty signature headers: refused when we expect a secret."""
    body = body_of("gitea/push.json")
    headers = gitea_headers(body)
    headers.update({"X-Gitea-Signature": "", "X-Gogs-Signature": ""})
    headers.update({"X-Hub-Signature-256": "sha256=", "X-Hub-Signature": "sha1="})
    with pytest.raises(SignatureError, match="missing signature"):
        verify(headers, body, SECRET)
    assert parse(headers, body)[0].kind == "push"
    verify(headers, body, None)


def test_gitea_body_secret_field_is_not_proof_of_origin() -> None:
    """Gitea's deprecated body "secret" does not authenticate a delivery, even when it matches."""
    body = body_of("gitea/push.json")
    body_secret = json.loads(body)["secret"]
    headers = gitea_headers(body, secret="attacker-key")
    with pytest.raises(SignatureError):
        verify(headers, body, body_secret)
    unsigned = {k: v for k, v in headers.items() if "Signature" not in k}
    with pytest.raises(SignatureError, match="missing signature"):
        verify(unsigned, body, body_secret)


def test_gitea_only_x_hub_signature_256_is_accepted() -> None:
    """Gitea/Forgejo deliveries verify with only their X-Hub-Signature-256 header."""
    for name in ("gitea/push.json", "forgejo/push.json"):
        headers = {
            k: v
            for k, v in headers_for(name).items()
            if k not in ("X-Gitea-Signature", "X-Forgejo-Signature", "X-Gogs-Signature")
        }
        verify(headers, body_of(name), SECRET)


def test_gitlab_token_must_match() -> None:
    """GitLab's X-Gitlab-Token passes when equal to the secret and fails, named, otherwise."""
    body = body_of("gitlab/push.json")
    verify(gitlab_headers("Push Hook"), body, SECRET)
    with pytest.raises(SignatureError) as err:
        verify(gitlab_headers("Push Hook", token="wrong"), body, SECRET)
    assert str(err.value) == "X-Gitlab-Token: token does not match"
    assert "wrong" not in str(err.value)


def gitlab_signed(body: bytes, stamp: int, key: bytes = SECRET.encode()) -> dict[str, str]:
    headers = gitlab_headers("Push Hook")
    del headers["X-Gitlab-Token"]
    msg_id = "msg_2b4e9c1f"
    mac = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    headers.update(
        {
            "webhook-id": msg_id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": "v1," + base64.b64encode(mac).decode(),
        }
    )
    return headers


def test_gitlab_signed_form_passes_with_fresh_timestamp() -> None:
    """GitLab's signed form (webhook-id.timestamp.body, base64 HMAC) verifies on the raw bytes."""
    body = body_of("gitlab/push.json")
    now = 1_700_000_000.0
    events = verify_and_parse(gitlab_signed(body, int(now) - 10), body, SECRET, now=now)
    assert events[0].after == "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"


def test_gitlab_signed_form_any_of_several_signatures() -> None:
    """Of several space-separated signatures, one that matches is enough."""
    body = body_of("gitlab/push.json")
    now = 1_700_000_000
    headers = gitlab_signed(body, now)
    headers["webhook-signature"] = "v1,AAAA v1a,xyz " + headers["webhook-signature"]
    verify(headers, body, SECRET, now=now)


def test_gitlab_signed_form_with_whsec_secret() -> None:
    """A Standard Webhooks secret (whsec_<base64>) is also tried as its decoded key."""
    key = bytes(range(32))
    secret = "whsec_" + base64.b64encode(key).decode()
    body = body_of("gitlab/push.json")
    verify(gitlab_signed(body, 1_700_000_000, key=key), body, secret, now=1_700_000_000)


@pytest.mark.parametrize("offset", [-301, 301, 3600])
def test_gitlab_signed_form_refuses_stale_timestamp(offset: int) -> None:
    """A correctly signed delivery whose timestamp is beyond max_age is refused, naming it."""
    body = body_of("gitlab/push.json")
    now = 1_700_000_000
    with pytest.raises(SignatureError) as err:
        verify(gitlab_signed(body, now - offset), body, SECRET, now=now)
    assert err.value.header == "webhook-timestamp"
    assert str(err.value).startswith("webhook-timestamp:")


def test_gitlab_signed_form_tampered_or_wrong_secret() -> None:
    """The signed form fails on a changed body, a wrong secret, or a non-numeric timestamp."""
    body = body_of("gitlab/push.json")
    now = 1_700_000_000
    headers = gitlab_signed(body, now)
    with pytest.raises(SignatureError, match="webhook-signature"):
        verify(headers, body + b" ", SECRET, now=now)
    with pytest.raises(SignatureError, match="webhook-signature"):
        verify(headers, body, "other", now=now)
    headers["webhook-timestamp"] = "soon"
    with pytest.raises(SignatureError, match="webhook-timestamp"):
        verify(headers, body, SECRET, now=now)
    del headers["webhook-id"]
    with pytest.raises(SignatureError, match="webhook-id"):
        verify(headers, body, SECRET, now=now)


def test_gitlab_signed_form_delivery_id() -> None:
    """Without X-Gitlab-Event-UUID, the signed form's webhook-id is the delivery id."""
    body = body_of("gitlab/push.json")
    headers = gitlab_signed(body, 1_700_000_000)
    del headers["X-Gitlab-Event-UUID"]
    assert parse(headers, body)[0].delivery_id == "msg_2b4e9c1f"


def test_verify_runs_before_json_is_read() -> None:
    """A bad signature on a non-JSON body is a signature error, not a payload error."""
    headers = github_headers("push", b"{}")
    with pytest.raises(SignatureError):
        verify_and_parse(headers, b"not json at all", SECRET)


def test_empty_secret_is_a_configuration_error() -> None:
    """An empty secret (an HMAC key anyone knows) is refused rather than silently used."""
    with pytest.raises(ValueError, match="empty"):
        verify(headers_for("github/push.json"), body_of("github/push.json"), "")


@pytest.mark.parametrize(
    ("name", "provider"),
    [
        ("github/push.json", "github"),
        ("gitlab/push.json", "gitlab"),
        ("gitea/push.json", "gitea"),
        ("forgejo/push.json", "forgejo"),
        ("bitbucket-cloud/push.json", "bitbucket-cloud"),
        ("bitbucket-server/push.json", "bitbucket-server"),
        ("bitbucket-server/ping.json", "bitbucket-server"),
    ],
)
def test_detect_provider_on_real_header_sets(name: str, provider: str) -> None:
    """Each provider's full header set is recognised, Forgejo and Gitea despite X-GitHub-Event."""
    assert {e.provider for e in parse(headers_for(name), body_of(name))} == {provider}


def test_detect_bitbucket_by_event_key_or_payload_shape() -> None:
    """Without the id headers, Bitbucket's flavour comes from the event key, else the body shape."""
    cloud = body_of("bitbucket-cloud/push.json")
    server = body_of("bitbucket-server/push.json")
    assert parse({"X-Event-Key": "repo:refs_changed"}, server)[0].provider == "bitbucket-server"
    assert parse({"X-Event-Key": "repo:push"}, cloud)[0].provider == "bitbucket-cloud"
    assert parse({"X-Event-Key": "x:y"}, cloud)[0].provider == "bitbucket-cloud"
    assert parse({"X-Event-Key": "x:y"}, server)[0].provider == "bitbucket-server"
    with pytest.raises(PayloadError, match="X-Event-Key"):
        parse({"X-Event-Key": "x:y"}, b"{}")


def test_unknown_provider_is_a_400() -> None:
    """A request of no known provider's shape is refused as a 400 naming the headers wanted
    (the generic X-Pipeline-Signature form is read in test_generic_form_signed_push)."""
    with pytest.raises(PayloadError, match="unknown webhook provider") as err:
        parse({"Content-Type": "application/json"}, b"{}")
    assert err.value.status == 400


def test_generic_form_signed_push() -> None:
    """The generic form verifies X-Pipeline-Signature and reads ref/before/after from the body."""
    sha = "9fdd7b96d3f5c276d0b9e0bf38c879eb112d889a"
    body = json.dumps({"ref": "refs/tags/v1.2.0", "after": sha}).encode()
    headers = {"X-Pipeline-Signature": "sha256=" + hex256(body), "X-Delivery-Id": "d-1"}
    [event] = verify_and_parse(headers, body, SECRET)
    assert (event.provider, event.kind, event.ref, event.after) == (
        "generic",
        "tag",
        "refs/tags/v1.2.0",
        sha,
    )
    assert event.delivery_id == "d-1"
    with pytest.raises(SignatureError, match="X-Pipeline-Signature"):
        verify(headers, body + b"\n", SECRET)


def test_github_release_other_actions_are_ignored() -> None:
    """A release event other than 'published' is ignored with its action in the reason."""
    data = json.loads(body_of("github/release-published.json"))
    data["action"] = "created"
    body = json.dumps(data).encode()
    [event] = parse(github_headers("release", body), body)
    assert event.kind == "ignored"
    assert "'created'" in event.reason


def test_bitbucket_several_changes_give_several_events() -> None:
    """A Bitbucket push carrying several changes yields one event per change, in order."""
    cloud = json.loads(body_of("bitbucket-cloud/push.json"))
    tag = json.loads(body_of("bitbucket-cloud/push-tag.json"))["push"]["changes"][0]
    cloud["push"]["changes"].append(tag)
    body = json.dumps(cloud).encode()
    events = parse(bb_cloud_headers(body), body)
    assert [e.ref for e in events] == ["refs/heads/feature/issue-819", "refs/tags/simple-tag"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ref", "refs/heads/../../etc", "'..'"),
        ("ref", "refs/heads/a b", "space"),
        ("ref", "refs/heads/a\nb", "control"),
        ("ref", "main", "refs/"),
        ("ref", "refs/heads/--upload-pack=x:y", "~ ^ :"),
        ("after", "abc", "40- or 64-hex"),
        ("after", 12, "40- or 64-hex"),
        ("before", "g" * 40, "40- or 64-hex"),
        ("ref", None, "without 'ref'"),
    ],
)
def test_bad_ref_or_sha_is_payload_error(field: str, value: object, message: str) -> None:
    """Refs and SHAs are validated; a bad value is a PayloadError naming the field."""
    data = json.loads(body_of("github/push.json"))
    data[field] = value
    body = json.dumps(data).encode()
    with pytest.raises(PayloadError) as err:
        parse(github_headers("push", body), body)
    assert message in str(err.value)
    assert field in str(err.value)


def test_sha256_repository_shas_are_accepted() -> None:
    """64-hex SHAs (SHA-256 repositories) pass validation."""
    data = json.loads(body_of("gitea/push.json"))
    data["before"], data["after"] = "a" * 64, "B" * 64
    body = json.dumps(data).encode()
    [event] = parse(gitea_headers(body), body)
    assert (event.before, event.after) == ("a" * 64, "b" * 64)


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[1, 2]", b'"text"', b"null", b"\xff\xfe\x00", b"[" * 100_000],
)
def test_non_object_bodies_are_payload_errors(body: bytes) -> None:
    """A body that is not a JSON object is a PayloadError (status 400), whatever it holds."""
    with pytest.raises(PayloadError) as err:
        parse(github_headers("push", body), body)
    assert err.value.status == 400


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*path, key))
    elif isinstance(value, list):
        for i, child in enumerate(value[:2]):
            yield from _paths(child, (*path, i))


def _replaced(data: Any, path: tuple[Any, ...], new: object) -> Any:
    if not path:
        return new
    copy = json.loads(json.dumps(data))
    target = copy
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = new
    return copy


@pytest.mark.parametrize("name", NAMES)
def test_fuzzed_bodies_only_raise_webhook_errors(name: str) -> None:
    """Truncated bodies and wrong-typed fields give events or a WebhookError, nothing else."""
    original = body_of(name)
    headers = headers_for(name)
    encode = form_of if is_form(name) else bytes
    rng = random.Random(name)
    cuts = {0, 1, len(original) - 1, *(rng.randrange(len(original)) for _ in range(40))}
    bodies = [original[:cut] for cut in cuts]
    data = json.loads(json_of(name))
    paths = [p for p in _paths(data) if len(p) <= 4]
    wrong: list[object] = [None, 0, -1, True, "", "x" * 3, [], {}, [None], {"a": 1}, ZERO]
    # Forms wrap the same JSON: fewer field variants (the JSON files test those), more cuts.
    for path in rng.sample(paths, min(len(paths), 12 if is_form(name) else 120)):
        for value in wrong:
            bodies.append(encode(json.dumps(_replaced(data, path, value)).encode()))
    for body in bodies:
        try:
            events = parse(headers, body)
        except WebhookError:
            continue
        assert events and all(isinstance(e, PushEvent) for e in events)


def test_fuzzed_headers_only_raise_webhook_errors() -> None:
    """Odd header values (non-ASCII, garbage timestamps, bare prefixes) give WebhookErrors only."""
    body = body_of("github/push.json")
    odd = ["", " ", "sha256=", "sha256=é", "v1,", "v1,ü", "１２３", "9" * 400, "sha1=00", "\x00"]
    bases = [headers_for(n) for n in ("github/push.json", "forgejo/push.json")]
    bases.append(gitlab_signed(body_of("gitlab/push.json"), 1_700_000_000))
    bases.append(bb_cloud_headers(body))
    for base in bases:
        for key in base:
            for value in odd:
                headers = {**base, key: value}
                for secret in (SECRET, None):
                    with contextlib.suppress(WebhookError):
                        verify_and_parse(headers, body, secret, now=1_700_000_000)


# -- form deliveries ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in NAMES if is_form(n)])
def test_form_delivery_reads_the_json_of_its_payload_field(name: str) -> None:
    """A form delivery (`payload=<JSON>`) gives exactly the events of its JSON sent as JSON."""
    headers = headers_for(name)
    as_json = {**headers, "Content-Type": "application/json"}
    assert parse(headers, body_of(name)) == parse(as_json, json_of(name))


def test_github_form_is_signed_over_the_form_body_as_sent() -> None:
    """GitHub signs a form delivery's body as sent: a signature over the JSON inside is refused."""
    name = "github/push-form.txt"
    body = body_of(name)
    verify(headers_for(name), body, SECRET)
    over_json = github_headers("push", json_of(name))
    over_json["Content-Type"] = FORM
    with pytest.raises(SignatureError, match="X-Hub-Signature-256: signature does not match"):
        verify(over_json, body, SECRET)


@pytest.mark.parametrize("provider", ["gitea", "forgejo"])
def test_gitea_form_is_signed_over_the_json_inside(provider: str) -> None:
    """Gitea and Forgejo sign a form delivery's JSON, not the form: a signature over the form
    body is refused, and the JSON's signature passes."""
    name = "extra/gitea/push-form.txt"
    body = body_of(name)
    make = gitea_headers if provider == "gitea" else forgejo_headers
    headers = {**make(json_of(name)), "Content-Type": FORM}
    [event] = verify_and_parse(headers, body, SECRET)
    assert (event.provider, event.after) == (provider, "bffeb74224043ba2feb48d137756c8a9331c449a")
    over_form = {**make(body), "Content-Type": FORM}
    with pytest.raises(SignatureError, match="signature does not match"):
        verify(over_form, body, SECRET)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "no 'payload' field"),
        (b"payload", "not application/x-www-form-urlencoded"),
        (b"ref=refs%2Fheads%2Fmain", "no 'payload' field"),
        (b"payload=%7B%7D&payload=%7B%7D", "2 'payload' fields"),
        (b"payload=%5B1%5D", "not an object"),
        (b"payload=%7Bnot+json", "not JSON"),
        (b"&".join(b"f%d=1" % i for i in range(100)), "not application/x-www-form-urlencoded"),
    ],
)
def test_bad_form_bodies_are_payload_errors(body: bytes, message: str) -> None:
    """A form body without exactly one JSON object in `payload` is a 400 saying what is wrong."""
    headers = {**github_headers("push", body), "Content-Type": FORM + "; charset=utf-8"}
    with pytest.raises(PayloadError) as err:
        verify_and_parse(headers, body, SECRET)
    assert message in str(err.value)
    assert err.value.status == 400


# -- the known-secret samples -------------------------------------------------------------------

KNOWN_SECRET = "Gkvl$k$wyNpQAF42"
KNOWN_SIGNATURES = {
    "bitbucket-cloud/push-signed.json": (
        "sha256=fc609cd0ac972d0b60c50f3c359eeef2eb1c3af77798186d05666a34a3a23e78"
    ),
    "bitbucket-server/push-signed.json": (
        "sha256=884e5ad4a731971260665e9e7d580480f06a4be91cf93632827a2eaad55f7f2b"
    ),
}


@pytest.mark.parametrize("name", sorted(KNOWN_SIGNATURES))
def test_bitbucket_signed_sample_verifies_with_its_published_secret(name: str) -> None:
    """Each Bitbucket flavour's signed sample verifies with the secret and X-Hub-Signature its
    source published (fixtures README), and not with another secret."""
    headers = headers_for(name)
    headers["X-Hub-Signature"] = KNOWN_SIGNATURES[name]
    [event] = verify_and_parse(headers, body_of(name), KNOWN_SECRET)
    assert event.ref == EXPECTED[name][1]
    with pytest.raises(SignatureError, match="X-Hub-Signature: signature does not match"):
        verify(headers, body_of(name), SECRET)


# -- releases and system hooks -------------------------------------------------------------------


def _with(name: str, **changes: Any) -> bytes:
    data = json.loads(json_of(name))
    data.update(changes)
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("name", "action", "kind"),
    [
        ("github/release-published.json", "published", "tag"),
        ("github/release-published.json", "released", "tag"),
        ("github/release-published.json", "created", "ignored"),
        ("github/release-published.json", "edited", "ignored"),
        ("github/release-published.json", "deleted", "ignored"),
        ("gitlab/release-hook.json", "create", "tag"),
        ("gitlab/release-hook.json", "update", "ignored"),
        ("gitlab/release-hook.json", "delete", "ignored"),
        ("gitea/release-published.json", "published", "tag"),
        ("gitea/release-published.json", "updated", "ignored"),
        ("gitea/release-published.json", "deleted", "ignored"),
        ("extra/forgejo/release-published.json", "deleted", "ignored"),
    ],
)
def test_release_actions(name: str, action: str, kind: str) -> None:
    """A published release deploys its tag; an edit or deletion is ignored, naming its action."""
    body = _with(name, action=action)
    headers = headers_for(name)
    if not name.startswith("gitlab/"):
        headers = github_headers("release", body) if name.startswith("github/") else headers
    [event] = parse(headers, body)
    assert event.kind == kind
    if kind == "ignored":
        assert repr(action) in event.reason
    else:
        assert event.release and event.ref == EXPECTED[name][1]


@pytest.mark.parametrize(
    ("event_name", "kind", "ref"),
    [
        ("push", "push", "refs/heads/master"),
        ("tag_push", "tag", "refs/tags/v1.0.0"),
        ("repository_update", "ignored", None),
        ("project_create", "ignored", None),
    ],
)
def test_gitlab_system_hook_kind_comes_from_event_name(
    event_name: str, kind: str, ref: str | None
) -> None:
    """A GitLab system hook (X-Gitlab-Event: System Hook for every event) is a push or tag push
    by its body's event_name, with or without object_kind; other system events are ignored."""
    body = _with("gitlab/system-hook-push.json", event_name=event_name, ref=ref or "refs/x/y")
    [event] = parse(gitlab_headers("System Hook"), body)
    assert (event.kind, event.ref if kind != "ignored" else None) == (kind, ref)
    assert event.repository[0] == "mike/diaspora"
    if kind == "ignored":
        assert repr(event_name) in event.reason


def test_bitbucket_server_tag_object_is_kept_with_several_changes() -> None:
    """With several changes, Bitbucket Data Center's single toCommit cannot say which change it
    belongs to: each change keeps its own toHash."""
    data = json.loads(body_of("bitbucket-server/push-annotated-tag.json"))
    data["changes"].append(json.loads(body_of("bitbucket-server/push.json"))["changes"][0])
    body = json.dumps(data).encode()
    events = parse(bb_server_headers(body, "repo:refs_changed"), body)
    assert [e.after for e in events] == [
        "118cc36527dd376b94de5b0e6424b1dfbd4717ff",
        "9fdd7b96d3f5c276d0b9e0bf38c879eb112d889a",
    ]
