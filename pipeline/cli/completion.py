"""Shell completion for bash, zsh and fish: `pipeline --install-completion` and
`--show-completion`, with click's completion scripts and protocol (click docs, "Shell
Completion": the script calls `_PIPELINE_COMPLETE=bash_complete pipeline`, …), and answers to
the scripts an earlier pipeline installed (typer's protocol: `_PIPELINE_COMPLETE=complete_bash`
with COMP_WORDS/COMP_CWORD, `complete_zsh` and `complete_fish` with `_TYPER_COMPLETE_ARGS`).

Imported only when completion is asked for. Where the scripts go is where typer put them, so
that installing again replaces an earlier script: bash `~/.bash_completions/PROG.sh` (sourced
from `~/.bashrc`), zsh `~/.zfunc/_PROG` (on `fpath` from `~/.zshrc`), fish
`~/.config/fish/completions/PROG.fish`."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import click
from click.shell_completion import (
    BashComplete,
    CompletionItem,
    ShellComplete,
    get_completion_class,
    split_arg_string,
)

SHELLS = ("bash", "zsh", "fish")


def complete_var(prog_name: str) -> str:
    """The environment variable the completion scripts set: `_PIPELINE_COMPLETE` for
    `pipeline` (click's rule: `_{PROG}_COMPLETE`, upper case, `-` and `.` as `_`)."""
    return f"_{prog_name}_COMPLETE".replace("-", "_").replace(".", "_").upper()


def detect_shell() -> str | None:
    """The shell this process runs under (bash, zsh, fish, …; found by shellingham from the
    parent processes), or None when it cannot tell."""
    import shellingham

    try:
        name: str = shellingham.detect_shell()[0]
    except shellingham.ShellDetectionFailure:
        return None
    return name


def script(cli: click.Command, prog_name: str, shell: str | None = None) -> str:
    """The completion script of `shell` (default: the detected one) for `prog_name`, as click
    writes it. Exits 1 for a shell other than bash, zsh and fish."""
    shell = shell or detect_shell()
    cls = get_completion_class(shell) if shell in SHELLS else None
    if shell is None or cls is None:
        click.echo(f"Shell {shell} is not supported.", err=True)
        raise click.exceptions.Exit(1)
    return cls(cli, {}, prog_name, complete_var(prog_name)).source()


def install(
    cli: click.Command, prog_name: str, shell: str | None = None, home: Path | None = None
) -> tuple[str, Path]:
    """Write the completion script of `shell` (default: the detected one) where that shell
    reads it, and the rc-file lines that load it (once); return (shell, the script's path).
    Exits 1 for a shell other than bash, zsh and fish."""
    shell = shell or detect_shell()
    text = script(cli, prog_name, shell)
    home = home or Path.home()
    assert shell is not None  # script() exited otherwise
    if shell == "bash":
        path = home / ".bash_completions" / f"{prog_name}.sh"
        _add_lines(home / ".bashrc", [f"source '{path}'"])
    elif shell == "zsh":
        path = home / ".zfunc" / f"_{prog_name}"
        rc = home / ".zshrc"
        lines = ["fpath+=~/.zfunc; autoload -Uz compinit; compinit"]
        if "zstyle" not in _read(rc):  # keep a style the user chose
            lines.append("zstyle ':completion:*' menu select")
        _add_lines(rc, lines)
    else:
        path = home / ".config" / "fish" / "completions" / f"{prog_name}.fish"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return shell, path


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def _add_lines(rc: Path, lines: list[str]) -> None:
    text = _read(rc)
    missing = [line for line in lines if line not in text]
    if missing:
        rc.parent.mkdir(parents=True, exist_ok=True)
        sep = "" if not text or text.endswith("\n") else "\n"
        rc.write_text(text + sep + "".join(f"{line}\n" for line in missing), encoding="utf-8")


# -- the protocol of scripts installed by the typer-based pipeline ---------------------------


class _LegacyBash(BashComplete):
    """COMP_WORDS and COMP_CWORD in (as click's bash), one bare value a line out."""

    def format_completion(self, item: CompletionItem) -> str:
        return item.value


def _typer_args() -> tuple[list[str], str]:
    line = os.environ.get("_TYPER_COMPLETE_ARGS", "")
    words = split_arg_string(line)[1:]
    if words and not line.endswith(" "):
        return words[:-1], words[-1]
    return words, ""


class _LegacyZsh(ShellComplete):
    """`_TYPER_COMPLETE_ARGS` in; an `_arguments` call (or `_files`) out, for the script to eval."""

    def get_completion_args(self) -> tuple[list[str], str]:
        return _typer_args()

    def format_completion(self, item: CompletionItem) -> str:
        def escape(s: str) -> str:
            return (
                s.replace('"', '""').replace("'", "''").replace("$", "\\$")
                .replace("`", "\\`").replace(":", r"\\:")
            )  # fmt: skip

        if item.help:
            return f'"{escape(item.value)}":"{escape(item.help)}"'
        return f'"{escape(item.value)}"'

    def complete(self) -> str:
        args, incomplete = self.get_completion_args()
        rows = [self.format_completion(i) for i in self.get_completions(args, incomplete)]
        if not rows:
            return "_files"
        joined = "\n".join(rows)
        return f"_arguments '*: :(({joined}))'"


class _LegacyFish(ShellComplete):
    """`_TYPER_COMPLETE_ARGS` in; with `_TYPER_COMPLETE_FISH_ACTION=get-args` the values (and
    help, tab-separated), with `is-args` exit 0 when there are any (else 1: complete files)."""

    def get_completion_args(self) -> tuple[list[str], str]:
        return _typer_args()

    def format_completion(self, item: CompletionItem) -> str:
        if item.help:
            help_text = re.sub(r"\s", " ", item.help)
            return f"{item.value}\t{help_text}"
        return item.value

    def complete(self) -> str:
        args, incomplete = self.get_completion_args()
        rows = [self.format_completion(i) for i in self.get_completions(args, incomplete)]
        if os.environ.get("_TYPER_COMPLETE_FISH_ACTION") == "is-args":
            sys.exit(0 if rows else 1)
        return "\n".join(rows)


_LEGACY: dict[str, type[ShellComplete]] = {
    "complete_bash": _LegacyBash,
    "complete_zsh": _LegacyZsh,
    "complete_fish": _LegacyFish,
}


def complete_legacy(cli: click.Command, prog_name: str, var: str, instruction: str) -> int:
    """Answer a completion request of a script the typer-based pipeline installed
    (`instruction`: complete_bash, complete_zsh or complete_fish); return the exit code (1 for
    an unknown instruction, as click does)."""
    cls = _LEGACY.get(instruction)
    if cls is None:
        return 1
    out: Any = cls(cli, {}, prog_name, var).complete()
    if out:
        click.echo(out)
    return 0
