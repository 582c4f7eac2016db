"""Docker's .dockerignore semantics, as a table of (patterns, path, excluded)."""

from __future__ import annotations

import pytest

from pipeline.plan.dockerignore import DockerIgnore, DockerIgnoreError, go_clean

CASES: list[tuple[str, str, bool]] = [
    # `*` stays within one path element
    ("*.md", "README.md", True),
    ("*.md", "docs/x.md", False),
    ("*/*.md", "docs/x.md", True),
    ("*", "anything", True),
    ("*", "dir/below", True),  # `*` matches the parent dir `dir`
    ("web/*.js", "web/app.js", True),
    ("web/*.js", "web/lib/app.js", False),
    ("web/*.js", "web/lib.js/app.go", True),  # the parent dir `web/lib.js` matches
    # `**` crosses directories, including none
    ("**/*.go", "main.go", True),
    ("**/*.go", "a/b/c/main.go", True),
    ("**/*.go", "a/b/c/main.js", False),
    ("a/**/b", "a/b", True),
    ("a/**/b", "a/x/y/b", True),
    ("a/**/b", "a/x/y/c", False),
    ("a/**", "a/x/y", True),
    ("**", "x/y/z", True),
    ("node_modules/**", "node_modules", False),  # `**` at the end needs something below
    # `?` is one character that is not `/`
    ("temp?", "tempa", True),
    ("temp?", "temp", False),
    ("temp?", "tempab", False),
    ("a?b", "a/b", False),
    # classes: ranges, `^` negation, escapes inside
    ("[abc].txt", "b.txt", True),
    ("[abc].txt", "d.txt", False),
    ("[a-c]x", "cx", True),
    ("[^a-c]x", "cx", False),
    ("[^a-c]x", "dx", True),
    ("[!]x", "!x", True),  # `!` is a member, not negation, in Go's filepath.Match
    ("[\\]]", "]", True),
    # escapes
    ("\\*.md", "*.md", True),
    ("\\*.md", "a.md", False),
    ("a\\?", "a?", True),
    ("a\\?", "ab", False),
    # a matching directory excludes everything below it
    ("docs", "docs/a/b.md", True),
    ("docs/", "docs/a/b.md", True),
    ("docs", "docsx/a.md", False),
    ("docs", "src/docs/a.md", False),  # anchored at the context root, unlike .gitignore
    ("*/temp*", "somedir/temporary.txt", True),
    ("*/*/temp*", "somedir/subdir/temporary.txt", True),
    # negation: the last matching line wins
    ("*.md\n!README.md", "README.md", False),
    ("*.md\n!README.md", "CHANGES.md", True),
    ("*.md\n!README*.md\nREADME-secret.md", "README-secret.md", True),
    ("*.md\n!README*.md\nREADME-secret.md", "README-public.md", False),
    ("*.md\nREADME-secret.md\n!README*.md", "README-secret.md", False),
    ("docs\n!docs/keep.md", "docs/keep.md", False),  # re-include below an excluded dir
    ("docs\n!docs/keep.md", "docs/drop.md", True),
    ("!x\nx", "x", True),
    ("*\n!web\nweb/*.log", "web/a.log", True),
    ("*\n!web\nweb/*.log", "web/a.js", False),
    ("*\n!web\nweb/*.log", "api/a.js", True),
    # cleaning: leading `/`, `./`, `..`, doubled and trailing slashes, whitespace
    ("/foo/bar", "foo/bar", True),
    ("/foo/bar", "x/foo/bar", False),
    ("./foo", "foo/x", True),
    ("foo//bar/", "foo/bar", True),
    ("a/../b", "b", True),
    ("  spaced.txt  ", "spaced.txt", True),
    ("! README.md\n*.md\n!  README.md", "README.md", False),
    # comments only in column 1; blank lines ignored
    ("# comment\n\n\n", "# comment", False),
    ("#*.md", "a.md", False),
    (" #x", "#x", True),  # not a comment: trimmed into a pattern
    ("\ufeffa.txt", "a.txt", True),  # a UTF-8 BOM is not part of the first pattern
    # regex metacharacters are literal
    ("a.b", "axb", False),
    ("a+(b)|{c}$", "a+(b)|{c}$", True),
    ("^x", "^x", True),
    # the path asked about is cleaned too
    ("foo", "./foo/x", True),
    ("foo", "/foo", True),
    ("", "x", False),
]


@pytest.mark.parametrize(("patterns", "path", "excluded"), CASES)
def test_excludes(patterns: str, path: str, excluded: bool) -> None:
    """Each (patterns, path) pair is excluded exactly when `docker build` would leave it out."""
    assert DockerIgnore.from_text(patterns).excludes(path) is excluded


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("!", "illegal exclusion pattern"),
        ("ok\n[abc", "line 2: bad pattern"),
        ("[z-a]", "runs backwards"),
        ("[]", "bad pattern"),
        ("a\\", "trailing backslash"),
    ],
)
def test_refuses_what_docker_refuses(text: str, message: str) -> None:
    """A line Docker would refuse raises DockerIgnoreError naming the line and the problem."""
    with pytest.raises(DockerIgnoreError, match=message.replace("[", r"\[")):
        DockerIgnore.from_text(text)


@pytest.mark.parametrize(
    ("path", "clean"),
    [
        ("", "."),
        ("./a/./b/", "a/b"),
        ("//a//b", "/a/b"),
        ("/../a", "/a"),
        ("../a", "../a"),
        ("a/..", "."),
        ("a/b/../../..", ".."),
    ],
)
def test_go_clean(path: str, clean: str) -> None:
    """go_clean behaves like Go's filepath.Clean, including rooted `..` and leading `//`."""
    assert go_clean(path) == clean


def test_patterns_are_kept_cleaned() -> None:
    """The parsed patterns are the cleaned lines, `!` kept, comments and blanks dropped."""
    ignore = DockerIgnore.from_text("# c\n/a/\n\n ! ./b \n")
    assert ignore.patterns == ("a", "!b")


@pytest.mark.parametrize(
    ("text", "directory", "expected"),
    [
        ("vendor\n", "vendor/lib", True),
        ("vendor\n!vendor/lib/keep.txt\n", "vendor/lib", False),
        ("vendor\n!*.txt\n", "vendor/lib", False),
        ("vendor/lib/docs\n", "vendor/lib", False),
        ("", "vendor/lib", False),
        ("vendor\n!other/x\n", "vendor/lib", True),
    ],
)
def test_excludes_all_under_a_submodule(text: str, directory: str, expected: bool) -> None:
    """A submodule folder counts as left out only when nothing under it can be re-included."""
    assert DockerIgnore.from_text(text).excludes_all_under(directory) is expected
