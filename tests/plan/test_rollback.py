"""Choosing a rollback's target as a table: release rows and the release deployed now in, the
release to restore (or the error a user reads) out."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pipeline.plan.rollback import NoRollbackTarget, PastRelease, choose_rollback


def rev(i: int) -> str:
    """Release i's revision: letters, so no revision starts with a release id's digits."""
    return "abcdefabcdef"[i - 1] * 40 if i <= 12 else "f" * 40


def d(i: int, status: str = "succeeded", revision: str | None = None) -> PastRelease:
    """A deploy, release i."""
    r = revision or rev(i)
    return PastRelease(i, "deploy", status, r, f"sha256:{r[:8]}", f"reg/web@sha256:{r[:8]}")


def rb(i: int, restores: int | None, of: int, status: str = "succeeded") -> PastRelease:
    """Release i, a rollback to release `of` (`restores` as recorded: None for an old row)."""
    return PastRelease(
        i, "rollback", status, rev(of), f"sha256:{rev(of)[:8]}", "reg/web@sha256:x", restores
    )


@dataclass(frozen=True)
class Case:
    id: str
    releases: list[PastRelease]
    current: int | None
    expect: int | str  # the release chosen, or a phrase of the error
    to: str | None = None


CASES = [
    Case("one back from the newest deploy", [d(1), d(2), d(3)], 3, 2),
    Case(
        "twice back: the second goes below the first's target",
        [d(1), d(2), d(3), rb(4, 2, 2)],
        4,
        1,
    ),
    Case(
        "three times back through a deeper history",
        [d(1), d(2), d(3), d(4), rb(5, 3, 3), rb(6, 2, 2)],
        6,
        1,
    ),
    Case(
        "all the way back: nothing earlier",
        [d(1), d(2), rb(3, 1, 1)],
        3,
        "no earlier succeeded release to go back to; it runs r1",
    ),
    Case(
        "a deploy after a rollback goes back to the restored release, not the one left",
        [d(1), d(2), d(3), rb(4, 2, 2), d(5)],
        5,
        2,
    ),
    Case("a release rolled back on failure is skipped", [d(1), d(2, "rolled_back"), d(3)], 3, 1),
    Case("a failed release is skipped", [d(1), d(2, "failed"), d(3)], 3, 1),
    Case(
        "a rollback that failed leaves the history as it was",
        [d(1), d(2), d(3), rb(4, 2, 2, "rolled_back")],
        3,
        2,
    ),
    Case("the release deployed now was cut short", [d(1), d(2), d(3, "interrupted")], 3, 2),
    Case("what is deployed is unknown: below the newest state", [d(1), d(2)], None, 1),
    Case(
        "a rollback recorded before rollbacks named their release is matched by revision",
        [d(1), d(2), d(3), rb(4, None, 2)],
        4,
        1,
    ),
    Case("never deployed", [], None, "no earlier succeeded release to go back to"),
    Case("--to a revision prefix", [d(1), d(2), d(3)], 3, 1, to="aaaa"),
    Case("--to a revision prefix in capitals", [d(1), d(2), d(3)], 3, 1, to="AAAA"),
    Case(
        "--to the revision a rollback left (forward again)",
        [d(1), d(2), d(3), rb(4, 2, 2)],
        4,
        3,
        to="cccc",
    ),
    Case("--to rN is a release id", [d(1), d(2), d(3)], 3, 1, to="r1"),
    Case("--to plain digits are a release id", [d(1), d(2), d(3)], 3, 2, to="2"),
    Case(
        "--to a rollback release means the release it restored",
        [d(1), d(2), d(3), rb(4, 1, 1), d(5)],
        5,
        1,
        to="r4",
    ),
    Case(
        "--to digits that are no release id are a revision prefix",
        [d(1), d(2, revision="77" + "e" * 38), d(3)],
        3,
        2,
        to="77",
    ),
    Case(
        "--to digits that are a release id and another release's revision prefix",
        [d(1), d(2, revision="3" + "e" * 39), d(3)],
        1,
        "'3' is both release r3 and a revision prefix",
        to="3",
    ),
    Case(
        "--to the release deployed now",
        [d(1), d(2), d(3)],
        3,
        "release r3 is what it runs now",
        to="r3",
    ),
    Case(
        "--to the revision deployed now",
        [d(1), d(2), d(3)],
        3,
        "it runs revision 'cccc' now (r3)",
        to="cccc",
    ),
    Case("--to an unknown release", [d(1), d(2)], 2, "it has no release r9", to="r9"),
    Case(
        "--to a release that failed",
        [d(1), d(2, "rolled_back"), d(3)],
        3,
        "release r2 did not succeed (rolled_back)",
        to="r2",
    ),
    Case(
        "--to a revision no succeeded release has",
        [d(1), d(2, "failed")],
        1,
        "no succeeded release at revision 'bbbb'",
        to="bbbb",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_choose_rollback(case: Case) -> None:
    """Each history gives the expected release, or an error naming the service and why."""
    if isinstance(case.expect, int):
        chosen = choose_rollback("web", case.releases, case.current, case.to)
        assert chosen.id == case.expect
        assert chosen.kind == "deploy"
    else:
        with pytest.raises(NoRollbackTarget) as err:
            choose_rollback("web", case.releases, case.current, case.to)
        assert str(err.value).startswith("service web: ")
        assert case.expect in str(err.value)


def test_rows_in_any_order() -> None:
    """The chooser orders rows by id itself, so newest-first rows give the same answer."""
    rows = [d(1), d(2), d(3), rb(4, 2, 2)]
    assert choose_rollback("web", rows[::-1], 4).id == 1
