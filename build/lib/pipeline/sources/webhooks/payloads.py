"""Push events read from webhook bodies of GitHub, GitLab, Gitea, Forgejo, Bitbucket and generic.

`parse` turns (headers, raw body) into PushEvents; it authenticates nothing (see
`pipeline.sources.webhooks.signatures.verify`). Refs and SHAs are validated before they leave this
module, because the server hands them to git: a malformed value is a PayloadError, never passed on.
The body is JSON, or a form (`application/x-www-form-urlencoded`) with the JSON in its `payload`
field (GitHub, Gitea, Gogs, Forgejo).

Kinds: "push" (branch created or updated), "tag" (tag created or updated, or a release published:
GitHub `release` published/released, GitLab `Release Hook` create, Gitea/Forgejo `release`
published; `release=True`), "ping", and "ignored" (any other event, and every deletion:
`deleted=True` with `ref` and `before` filled in, `after=None`, so a server that cares about
deletions can still act). Each event carries the repository names the delivery gives
(`repository`: full name first, then clone and web URLs) for `identity.same_repository`.

Where each provider puts these fields: tests/fixtures/webhooks/README.md, from the providers'
documentation (GitHub "Webhook events and payloads", GitLab "Webhook events" and "System hooks",
Gitea and Forgejo "Webhooks", Bitbucket "Event payloads").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.sources.refs import HEX_SHA
from pipeline.sources.webhooks.signatures import (
    PayloadError,
    bitbucket_flavour_from_payload,
    json_bytes,
    load_json_object,
    lower_headers,
    provider_from_headers,
)

_MAX_REF_LEN = 1024
_MAX_DELIVERY_ID_LEN = 200
_MAX_NAME_LEN = 500
_MAX_NAMES = 12
# Characters git check-ref-format refuses anywhere in a ref name.
_REF_FORBIDDEN = frozenset("~^:?*[\\")

_DELIVERY_HEADERS: dict[str, tuple[str, ...]] = {
    "github": ("x-github-delivery",),
    "gitlab": ("x-gitlab-event-uuid", "webhook-id"),
    "gitea": ("x-gitea-delivery",),
    "forgejo": ("x-forgejo-delivery", "x-gitea-delivery"),
    "bitbucket-cloud": ("x-request-uuid",),
    "bitbucket-server": ("x-request-id",),
    "generic": ("x-delivery-id",),
}


@dataclass(frozen=True)
class PushEvent:
    """One ref change (or ping, or ignored delivery) announced by a git host.

    `repository`: the names the delivery gives its repository, as given (full name or path
    with namespace first, then clone and web URLs; empty when it names none). `release`: True
    when a release event announced the tag; such an event may name no commit (`after=None`)."""

    provider: str
    kind: str
    ref: str | None
    before: str | None
    after: str | None
    delivery_id: str | None
    deleted: bool = False
    reason: str = ""
    repository: tuple[str, ...] = ()
    release: bool = False


def parse(headers: Mapping[str, str], body: bytes) -> list[PushEvent]:
    """Read the push events of one delivery; always at least one event (maybe "ignored").

    Raises PayloadError for a body that is not a JSON object (or a form without one in its
    `payload` field) or lacks or mangles a field.
    """
    h = lower_headers(headers)
    provider = provider_from_headers(h)
    data = load_json_object(json_bytes(h, body))
    if provider == "bitbucket":
        provider = bitbucket_flavour_from_payload(data)
    delivery = _delivery_id(provider, h)
    names = _repository_names(provider, data)
    return _PARSERS[provider](h, data, _Ctx(provider, delivery, names))


@dataclass(frozen=True)
class _Ctx:
    provider: str
    delivery_id: str | None
    repository: tuple[str, ...] = ()

    def event(self, kind: str, reason: str = "", **fields: Any) -> PushEvent:
        values: dict[str, Any] = {"ref": None, "before": None, "after": None, "deleted": False}
        values.update(fields)
        return PushEvent(
            provider=self.provider,
            kind=kind,
            delivery_id=self.delivery_id,
            reason=reason,
            repository=self.repository,
            **values,
        )

    def release(self, tag: object, where: str, sha: str | None = None) -> PushEvent:
        """A published release of `tag` (a short name): a tag event, its commit if named."""
        if not isinstance(tag, str) or not tag:
            raise PayloadError(f"{where}: expected a tag name, got {_show(tag)}")
        ref = _ref("refs/tags/" + tag, where)
        return self.event("tag", "release published", ref=ref, after=sha, release=True)

    def ignored(self, reason: str) -> list[PushEvent]:
        return [self.event("ignored", reason)]

    def ref_change(
        self, ref: str, before: str | None, after: str | None, *, deleted: bool = False
    ) -> PushEvent:
        """Classify a validated ref update: branch/tag, created (before None), deleted."""
        what = _ref_kind(ref)
        if deleted or after is None:
            noun = {"push": "branch", "tag": "tag"}.get(what or "", "ref")
            return self.event("ignored", f"{noun} deletion", ref=ref, before=before, deleted=True)
        if what is None:
            return self.event(
                "ignored",
                f"ref {ref!r} is neither a branch nor a tag",
                ref=ref,
                before=before,
                after=after,
            )
        return self.event(what, ref=ref, before=before, after=after)


def _delivery_id(provider: str, h: Mapping[str, str]) -> str | None:
    for name in _DELIVERY_HEADERS[provider]:
        value = h.get(name, "").strip()
        if value:
            return value[:_MAX_DELIVERY_ID_LEN]
    return None


def _dig(data: Any, *path: str | int) -> Any:
    for step in path:
        if isinstance(step, int):
            data = data[step] if isinstance(data, list) and len(data) > step else None
        else:
            data = data.get(step) if isinstance(data, dict) else None
    return data


# Where each provider names the repository (tests/fixtures/webhooks/README.md, "Where the
# repository is named"): full names first, then clone and web URLs.
_NAME_FIELDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "github": (
        ("repository", "full_name"),
        ("repository", "clone_url"),
        ("repository", "ssh_url"),
        ("repository", "git_url"),
        ("repository", "html_url"),
    ),
    "gitlab": (
        ("project", "path_with_namespace"),
        ("project", "git_http_url"),
        ("project", "git_ssh_url"),
        ("project", "web_url"),
        ("repository", "git_http_url"),
        ("repository", "git_ssh_url"),
        ("repository", "homepage"),
    ),
    "gitea": (
        ("repository", "full_name"),
        ("repository", "clone_url"),
        ("repository", "ssh_url"),
        ("repository", "html_url"),
    ),
    "bitbucket-cloud": (("repository", "full_name"), ("repository", "links", "html", "href")),
    "generic": (),
}
_NAME_FIELDS["forgejo"] = _NAME_FIELDS["gitea"]


def _repository_names(provider: str, data: Mapping[str, Any]) -> tuple[str, ...]:
    """The names the body gives its repository, unvalidated text (only compared, never run)."""
    found: list[Any] = [_dig(data, *path) for path in _NAME_FIELDS.get(provider, ())]
    if provider == "bitbucket-server":
        key, slug = _dig(data, "repository", "project", "key"), _dig(data, "repository", "slug")
        if isinstance(key, str) and isinstance(slug, str):
            found.append(f"{key}/{slug}")
        clones = _dig(data, "repository", "links", "clone")
        for link in clones[:_MAX_NAMES] if isinstance(clones, list) else ():
            found.append(_dig(link, "href"))
    names: list[str] = []
    for value in found:
        if isinstance(value, str) and value.strip() and value not in names:
            names.append(value.strip()[:_MAX_NAME_LEN])
    return tuple(names[:_MAX_NAMES])


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field(obj: Mapping[str, Any], key: str, where: str, what: str = "push event") -> Any:
    if key not in obj or obj[key] is None:
        raise PayloadError(f"{what} without '{where}{key}'")
    return obj[key]


def _text(obj: Mapping[str, Any], key: str, where: str, what: str = "push event") -> str:
    value = _field(obj, key, where, what)
    if not isinstance(value, str):
        raise PayloadError(f"{where}{key}: expected a string, got {_show(value)}")
    return value


def _object(obj: Mapping[str, Any], key: str, where: str, what: str = "push event") -> Any:
    value = _field(obj, key, where, what)
    if not isinstance(value, dict):
        raise PayloadError(f"{where}{key}: expected an object, got {_show(value)}")
    return value


def _list(obj: Mapping[str, Any], key: str, where: str, what: str = "push event") -> list[Any]:
    value = _field(obj, key, where, what)
    if not isinstance(value, list):
        raise PayloadError(f"{where}{key}: expected a list, got {_show(value)}")
    return value


def _flag(obj: Mapping[str, Any], key: str, where: str) -> bool:
    value = obj.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise PayloadError(f"{where}{key}: expected true or false, got {_show(value)}")
    return value


def _sha(value: object, where: str) -> str | None:
    """Validate a commit SHA (40 or 64 hex); all zeros (a ref created or deleted) gives None."""
    if not isinstance(value, str) or not HEX_SHA.fullmatch(value.lower()):
        raise PayloadError(f"{where}: not a 40- or 64-hex commit SHA: {_show(value)}")
    sha = value.lower()
    return None if sha.strip("0") == "" else sha


def _ref(value: object, where: str) -> str:
    """Validate a full ref name; refuse what git would refuse or could read as an option."""
    if not isinstance(value, str):
        raise PayloadError(f"{where}: expected a ref name, got {_show(value)}")
    problem = None
    if not value.startswith("refs/"):
        problem = "does not start with refs/"
    elif len(value) > _MAX_REF_LEN:
        problem = f"is longer than {_MAX_REF_LEN} characters"
    elif ".." in value or "@{" in value or "//" in value or "/." in value:
        problem = "contains '..', '@{', '//' or '/.'"
    elif any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        problem = "contains a space or control character"
    elif any(c in _REF_FORBIDDEN for c in value):
        problem = "contains one of ~ ^ : ? * [ \\"
    elif value.endswith(("/", ".", ".lock")):
        problem = "ends with '/', '.' or '.lock'"
    if problem:
        raise PayloadError(f"{where}: ref {_show(value)} {problem}")
    return value


def _ref_kind(ref: str) -> str | None:
    if ref.startswith("refs/heads/"):
        return "push"
    if ref.startswith("refs/tags/"):
        return "tag"
    return None


def _not_push(event: str) -> str:
    return f"event {event!r} is not a push" if event else "no event header"


def _simple_push(data: Mapping[str, Any], ctx: _Ctx, *, deleted: bool = False) -> PushEvent:
    """The GitHub-shaped push body that GitHub, GitLab, Gitea and Forgejo share."""
    ref = _ref(_field(data, "ref", ""), "ref")
    before = _sha(_field(data, "before", ""), "before")
    after = _sha(_field(data, "after", ""), "after")
    return ctx.ref_change(ref, before, after, deleted=deleted)


def _github(h: Mapping[str, str], data: Mapping[str, Any], ctx: _Ctx) -> list[PushEvent]:
    event = h.get("x-github-event", "").strip()
    if event == "ping":
        hook = data.get("hook_id")
        return [ctx.event("ping", f"ping from GitHub hook {_show(hook)}")]
    if event == "push":
        return [_simple_push(data, ctx, deleted=_flag(data, "deleted", ""))]
    if event == "release":
        # "released" also comes when a pre-release becomes a release; "created" is a draft
        # or not yet published, "edited"/"deleted"/"unpublished" change nothing to deploy.
        return [_release_tag_name(data, ctx, ("published", "released"))]
    return ctx.ignored(_not_push(event))


def _release_tag_name(data: Mapping[str, Any], ctx: _Ctx, actions: tuple[str, ...]) -> PushEvent:
    """GitHub's, Gitea's and Forgejo's `release` event: `action`, `release.tag_name`; no SHA
    (`target_commitish` is a branch name or a SHA): the tag is resolved when fetched."""
    action = data.get("action")
    if action not in actions:
        wanted = " or ".join(repr(a) for a in actions)
        return ctx.event("ignored", f"release action {_show(action)} is not {wanted}")
    release = _object(data, "release", "", "release event")
    return ctx.release(_field(release, "tag_name", "release.", "release event"), "release.tag_name")


def _gitlab(h: Mapping[str, str], data: Mapping[str, Any], ctx: _Ctx) -> list[PushEvent]:
    event = h.get("x-gitlab-event", "").strip()
    if event == "Release Hook":
        return [_gitlab_release(data, ctx)]
    is_push = event in ("Push Hook", "Tag Push Hook")
    # A system hook says "System Hook" for every event: the body's event_name (object_kind in
    # current GitLab too) tells a push (GitLab docs, "System hooks", push and tag events).
    if event == "System Hook":
        what = data.get("event_name", data.get("object_kind"))
        if what not in ("push", "tag_push"):
            return ctx.ignored(f"system hook event {_show(what)} is not a push")
        is_push = True
    if not is_push:
        return ctx.ignored(_not_push(event))
    # checkout_sha is null when the ref was deleted (after is then all zeros as well).
    deleted = "checkout_sha" in data and data["checkout_sha"] is None
    return [_simple_push(data, ctx, deleted=deleted)]


def _gitlab_release(data: Mapping[str, Any], ctx: _Ctx) -> PushEvent:
    """GitLab's Release Hook: `action` create/update/delete, `tag` (short name), `commit.id`."""
    action = data.get("action")
    if action != "create":
        return ctx.event("ignored", f"release action {_show(action)} is not 'create'")
    commit = _object(data, "commit", "", "release event")
    sha = _sha(_field(commit, "id", "commit.", "release event"), "commit.id")
    return ctx.release(_field(data, "tag", "", "release event"), "tag", sha)


def _gitea_like(event_headers: tuple[str, ...]) -> _Parser:
    def parse_gitea(h: Mapping[str, str], data: Mapping[str, Any], ctx: _Ctx) -> list[PushEvent]:
        event = next((h[n].strip() for n in event_headers if h.get(n, "").strip()), "")
        if event == "release":
            # Gitea and Forgejo send "published", "updated" or "deleted" (modules/structs/hook.go).
            return [_release_tag_name(data, ctx, ("published",))]
        if event != "push":
            return ctx.ignored(_not_push(event))
        # The body's "secret" field (old Gitea) is deliberately never read.
        return [_simple_push(data, ctx)]

    return parse_gitea


def _bitbucket_cloud(h: Mapping[str, str], data: Mapping[str, Any], ctx: _Ctx) -> list[PushEvent]:
    key = h.get("x-event-key", "").strip()
    if key != "repo:push":
        return ctx.ignored(_not_push(key))
    push = _object(data, "push", "")
    events = []
    for i, change in enumerate(_list(push, "changes", "push.")):
        where = f"push.changes[{i}]"
        if not isinstance(change, dict):
            raise PayloadError(f"{where}: expected an object, got {_show(change)}")
        events.append(_bitbucket_cloud_change(change, where, ctx))
    return events or ctx.ignored("push carries no changes")


def _bitbucket_cloud_change(change: Mapping[str, Any], where: str, ctx: _Ctx) -> PushEvent:
    sides: dict[str, Mapping[str, Any] | None] = {}
    for side in ("new", "old"):
        value = change.get(side)
        if value is not None and not isinstance(value, dict):
            raise PayloadError(f"{where}.{side}: expected an object or null, got {_show(value)}")
        sides[side] = value
    new, old = sides["new"], sides["old"]
    named = new if new is not None else old
    if named is None:
        raise PayloadError(f"{where}: neither 'new' nor 'old' is set")
    side_name = "new" if new is not None else "old"
    name = _text(named, "name", f"{where}.{side_name}.")
    ref_type = _text(named, "type", f"{where}.{side_name}.")
    prefix = {"branch": "refs/heads/", "tag": "refs/tags/"}.get(ref_type)
    if prefix is None:
        return ctx.event("ignored", f"{where}: ref type {ref_type!r} is neither branch nor tag")
    ref = _ref(prefix + name, f"{where}.{side_name}.name")
    after = _cloud_hash(new, f"{where}.new") if new is not None else None
    before = _cloud_hash(old, f"{where}.old") if old is not None else None
    return ctx.ref_change(ref, before, after, deleted=new is None)


def _cloud_hash(side: Mapping[str, Any], where: str) -> str | None:
    target = _object(side, "target", f"{where}.")
    return _sha(_field(target, "hash", f"{where}.target."), f"{where}.target.hash")


def _bitbucket_server(h: Mapping[str, str], data: Mapping[str, Any], ctx: _Ctx) -> list[PushEvent]:
    key = h.get("x-event-key", "").strip()
    if key == "diagnostics:ping":
        return [ctx.event("ping", "Bitbucket Server test connection")]
    if key != "repo:refs_changed":
        return ctx.ignored(_not_push(key))
    events = []
    changes = _list(data, "changes", "")
    for i, change in enumerate(changes):
        where = f"changes[{i}]"
        if not isinstance(change, dict):
            raise PayloadError(f"{where}: expected an object, got {_show(change)}")
        ref_id = change.get("refId")
        if ref_id is None and isinstance(change.get("ref"), dict):
            ref_id = change["ref"].get("id")  # the same full name, nested
        if ref_id is None:
            raise PayloadError(f"push event without '{where}.refId'")
        ref = _ref(ref_id, f"{where}.refId")
        before = _sha(_field(change, "fromHash", f"{where}."), f"{where}.fromHash")
        after = _sha(_field(change, "toHash", f"{where}."), f"{where}.toHash")
        deleted = change.get("type") == "DELETE"
        to_commit = _dig(data, "toCommit", "id")
        if after is not None and not deleted and len(changes) == 1 and to_commit is not None:
            # An annotated tag's toHash is the tag object; toCommit (Data Center, one change)
            # is the commit it points to, as Bitbucket Cloud's target.hash is.
            after = _sha(to_commit, "toCommit.id")
        events.append(ctx.ref_change(ref, before, after, deleted=deleted))
    return events or ctx.ignored("push carries no changes")


def _generic(h: Mapping[str, str], data: Mapping[str, Any], ctx: _Ctx) -> list[PushEvent]:
    """Body {"ref": full ref, "after"?: sha, "before"?: sha, "deleted"?: bool}."""
    event = h.get("x-pipeline-event", "push").strip() or "push"
    if event == "ping":
        return [ctx.event("ping", "generic ping")]
    if event != "push":
        return ctx.ignored(_not_push(event))
    ref = _ref(_field(data, "ref", ""), "ref")
    before = _sha(data["before"], "before") if data.get("before") is not None else None
    raw_after = data.get("after")
    # Without "after" the sender asks the server to resolve the ref: a push, not a deletion.
    after = _sha(raw_after, "after") if raw_after is not None else None
    deleted = _flag(data, "deleted", "") or (raw_after is not None and after is None)
    if after is None and not deleted:
        kind = _ref_kind(ref)
        if kind is None:
            return ctx.ignored(f"ref {ref!r} is neither a branch nor a tag")
        return [ctx.event(kind, ref=ref, before=before)]
    return [ctx.ref_change(ref, before, after, deleted=deleted)]


_Parser = Callable[[Mapping[str, str], Mapping[str, Any], _Ctx], list[PushEvent]]

_PARSERS: dict[str, _Parser] = {
    "github": _github,
    "gitlab": _gitlab,
    "gitea": _gitea_like(("x-gitea-event", "x-gogs-event", "x-github-event")),
    "forgejo": _gitea_like(("x-forgejo-event", "x-gitea-event", "x-github-event")),
    "bitbucket-cloud": _bitbucket_cloud,
    "bitbucket-server": _bitbucket_server,
    "generic": _generic,
}
