"""Which `[images.NAME]` keys only BuildKit honours, and the secrets an image asks for: pure.

Docker's legacy builder has no `--secret` and no cache export/import specs (`type=registry,...`),
so `secrets`, `cache_from` and `cache_to` need BuildKit (Docker docs, "Build secrets" and
"Cache storage backends"). `target` does not: the legacy builder builds a stage too (the Engine
API's `target` parameter, `POST /build`), so it works on both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config.model import ImageSection

BUILDKIT_ONLY_KEYS = ("secrets", "cache_from", "cache_to")


@dataclass(frozen=True)
class SecretSource:
    """One build secret: BuildKit's `id`, and where its value comes from (an environment
    variable or a file path); `key` is the config key it was given as (`npm_token_env`)."""

    id: str
    kind: Literal["env", "file"]
    source: str
    key: str


def buildkit_only_keys(image: ImageSection) -> list[str]:
    """The keys of `image` set to something only BuildKit can do, in BUILDKIT_ONLY_KEYS order."""
    return [key for key in BUILDKIT_ONLY_KEYS if getattr(image, key)]


def secret_sources(image: ImageSection) -> list[SecretSource]:
    """The image's `secrets` table as sources, sorted by id: `npm_token_env = "NPM_TOKEN"` is
    SecretSource("npm_token", "env", "NPM_TOKEN", "npm_token_env") (the suffix says where from;
    the config model has checked that every key has one)."""
    out = []
    for key, source in image.secrets.items():
        stem, _, kind = key.rpartition("_")
        out.append(SecretSource(stem, "env" if kind == "env" else "file", source, key))
    return sorted(out, key=lambda s: s.id)


def cache_from_image(spec: str) -> str | None:
    """The image a `cache_from` spec reads from when it is one the classic `docker build` takes
    (a plain image ref, or `type=registry,ref=IMAGE`), else None (it needs buildx)."""
    if "=" not in spec:
        return spec
    fields = dict(part.partition("=")[::2] for part in spec.split(","))
    if fields.get("type") == "registry" and fields.get("ref") and len(fields) == 2:
        return fields["ref"]
    return None


def inline_cache_to(spec: str) -> bool:
    """True for `type=inline`, the only export the classic `docker build` does (through the
    BUILDKIT_INLINE_CACHE=1 build arg, Docker docs "Inline cache")."""
    return spec.replace(" ", "") == "type=inline"


def unsupported_keys(
    image: ImageSection, builder: Literal["buildx", "buildkit", "legacy"], why: str = ""
) -> list[tuple[str, str]]:
    """(key, message) for each key of `image` the resolved builder cannot honour: on `legacy`
    every BuildKit-only key; on `buildkit` (`DOCKER_BUILDKIT=1 docker build`, no buildx) the
    cache specs other than registry images and `type=inline`. `why` says why the builder is
    what it is (quoted in the message)."""
    because = f" ({why})" if why else ""
    if builder == "legacy":
        return [
            (key, f"needs BuildKit, but this image builds with the legacy builder{because}")
            for key in buildkit_only_keys(image)
        ]
    if builder == "buildx":
        return []
    out = []
    for spec in image.cache_from:
        if cache_from_image(spec) is None:
            out.append(
                (
                    "cache_from",
                    f"{spec!r} needs docker buildx (the CLI has none{because}); "
                    "without it only 'type=registry,ref=IMAGE' or an image works",
                )
            )
    for spec in image.cache_to:
        if not inline_cache_to(spec):
            out.append(
                (
                    "cache_to",
                    f"{spec!r} needs docker buildx (the CLI has none{because}); "
                    "without it only 'type=inline' works",
                )
            )
    return out
