"""Which lab `pipeline demo` brings up for a config: the subnet its hosts and registry live on."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config.load import load
from pipeline.lab.demo import config_subnet

EXAMPLE = Path(__file__).resolve().parents[2] / "pipeline.example.toml"


@pytest.mark.parametrize(
    ("old", "new", "subnet"),
    [
        (None, None, "10.88.0.0/24"),  # the example as shipped: the lab's default subnet
        ("10.88.0.", "10.88.110.", "10.88.110.0/24"),  # made for a lab on another subnet
    ],
)
def test_demo_brings_up_the_lab_the_config_names(
    tmp_path: Path, old: str | None, new: str | None, subnet: str
) -> None:
    """A config written for a lab on another subnet makes the demo bring up (or reuse) a lab
    on that subnet rather than replacing it with one on the default subnet."""
    text = EXAMPLE.read_text()
    if old and new:
        text = text.replace(old, new)
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    assert config_subnet(load(path)) == subnet
