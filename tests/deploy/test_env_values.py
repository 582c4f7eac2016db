"""An env_file's text becomes a container's environment as python-dotenv reads a .env file."""

from __future__ import annotations

from pipeline.config.envfile import env_values


def test_env_file_text_is_read_like_a_dotenv_file_without_expansion() -> None:
    """Quotes, `export` and comments are understood; `${VAR}` stays literal (pipeline's own
    environment never leaks into a container); a bare name without "=" is left out."""
    text = (
        "# settings\n"
        "PLAIN=1\n"
        'QUOTED="two words"\n'
        "export EXPORTED=yes\n"
        "LITERAL=${HOME}/x\n"
        "BARE\n"
    )
    assert env_values(text) == {
        "PLAIN": "1",
        "QUOTED": "two words",
        "EXPORTED": "yes",
        "LITERAL": "${HOME}/x",
    }
