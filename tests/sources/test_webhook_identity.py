"""Which repository a webhook delivery is about: a table over the pure comparison of a repo's
`url` (and `webhook_repository`) with the names deliveries give (tests/fixtures/webhooks)."""

from __future__ import annotations

import pytest

from pipeline.sources.webhooks.identity import RepositoryName, repository_name, same_repository

GITHUB = (
    "example-org/shop",
    "https://github.com/example-org/shop.git",
    "git@github.com:example-org/shop.git",
    "git://github.com/example-org/shop.git",
    "https://github.com/example-org/shop",
)
GITLAB_SYSTEM = (  # gitlab/system-hook-push.json
    "mike/diaspora",
    "http://example.com/mike/diaspora.git",
    "git@example.com:mike/diaspora.git",
    "http://example.com/mike/diaspora",
)
BB_SERVER = (  # bitbucket-server/push-annotated-tag.json
    "EXAMPLE/test-repos",
    "http://localhost:7990/bitbucket/scm/example-user/test-repos.git",
    "ssh://git@localhost:7999/example-user/test-repos.git",
)
BB_CLOUD = ("example-user/test-repos", "https://bitbucket.org/example-user/test-repos")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "https://github.com/Example-Org/Shop.git",
            RepositoryName("github.com", "example-org/shop"),
        ),
        ("https://user:tok@GitHub.com:443/o/n.git/", RepositoryName("github.com", "o/n")),
        ("ssh://git@host:2222/group/sub/name.git", RepositoryName("host", "group/sub/name")),
        ("git@github.com:o/n.git", RepositoryName("github.com", "o/n")),
        ("github.com:o/n", RepositoryName("github.com", "o/n")),
        ("o/n", RepositoryName(None, "o/n")),
        ("/srv/git/shop.git", RepositoryName(None, "srv/git/shop", local=True)),
        ("file:///srv/git/shop.git", RepositoryName(None, "srv/git/shop", local=True)),
        ("  ", None),
    ],
)
def test_repository_name_normalises(text: str, expected: RepositoryName | None) -> None:
    """Scheme, credentials, port, `.git`, slashes and case are dropped; scp-style is read as
    ssh; a local path or file:// URL is marked local."""
    assert repository_name(text) == expected


@pytest.mark.parametrize(
    ("url", "webhook_repository", "names", "same"),
    [
        # the url compared with the delivery's URLs on the same host
        ("https://github.com/example-org/shop.git", None, GITHUB, True),
        ("git@github.com:Example-Org/shop", None, GITHUB, True),
        ("ssh://git@github.com/example-org/shop.git", None, GITHUB, True),
        ("https://deploy:secret@github.com/example-org/shop", None, GITHUB, True),
        ("https://github.com/example-org/other.git", None, GITHUB, False),
        ("git@example.com:acme/shop.git", None, GITLAB_SYSTEM, False),
        ("http://example.com/mike/diaspora", None, GITLAB_SYSTEM, True),
        ("ssh://git@localhost:7999/example-user/test-repos.git", None, BB_SERVER, True),
        ("https://localhost/bitbucket/scm/example-user/other.git", None, BB_SERVER, False),
        ("git@bitbucket.org:example-user/test-repos.git", None, BB_CLOUD, True),
        ("git@bitbucket.org:example-user/else.git", None, BB_CLOUD, False),
        # cannot be compared: a local path, a mirror on another host, an ssh host alias
        ("/srv/git/shop.git", None, GITHUB, None),
        ("file:///srv/git/other.git", None, GITHUB, None),
        ("https://mirror.internal/shop.git", None, GITHUB, None),
        ("git@github-deploy:example-org/other.git", None, GITHUB, None),
        # webhook_repository decides, whatever the url
        ("/srv/git/shop.git", "example-org/shop", GITHUB, True),
        ("/srv/git/shop.git", "Example-Org/Shop", GITHUB, True),
        ("https://mirror.internal/shop.git", "example-org/other", GITHUB, False),
        ("https://github.com/example-org/shop.git", "acme/shop", GITHUB, False),
        ("/srv/git/shop.git", "acme/shop", GITLAB_SYSTEM, False),
        ("/srv/git/repos.git", "example/test-repos", BB_SERVER, True),
        ("/srv/git/repos.git", "example-user/test-repos", BB_CLOUD, True),
        # a delivery naming no repository (a ping, the generic form) cannot be compared
        ("https://github.com/example-org/shop.git", "acme/shop", (), None),
    ],
)
def test_same_repository(
    url: str, webhook_repository: str | None, names: tuple[str, ...], same: bool | None
) -> None:
    """A delivery is this repo's when its names match the url on the same host (or, when set,
    webhook_repository); None when the two cannot be compared."""
    assert same_repository(url, webhook_repository, names) is same
