"""The lab's Caddy image context: the binary with every library and the loader ldd names."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest

from pipeline.lab.manage import LabHost, render_toml
from pipeline.lab.proxy_image import shared_libraries, write_context


@pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy is not installed")
def test_the_context_carries_caddy_its_libraries_and_the_loader(tmp_path: Path) -> None:
    """Every library `ldd /usr/bin/caddy` lists, the loader included, is in the image's root at
    its own path, beside /usr/bin/caddy and the Caddyfile the official image's CMD reads."""
    write_context(tmp_path)
    root = tmp_path / "rootfs"
    libs = shared_libraries(Path("/usr/bin/caddy"))
    assert any("ld-linux" in str(p) for p in libs)
    for path in [Path("/usr/bin/caddy"), *libs, Path("/etc/caddy/Caddyfile")]:
        assert (root / path.relative_to("/")).is_file(), path
    assert 'CMD ["caddy", "run"' in (tmp_path / "Dockerfile").read_text()


def test_the_lab_tables_name_its_proxy_image() -> None:
    """`lab up` prints a `[proxy]` table with the lab registry's Caddy image."""
    text = render_toml("10.0.0.1:5000", False, [LabHost("lab-1", "tcp://10.0.0.2:2375",
                       "10.0.0.2")], "10.0.0.1:5000/pipeline-caddy:2.6.2")  # fmt: skip
    assert tomllib.loads(text)["proxy"]["image"] == "10.0.0.1:5000/pipeline-caddy:2.6.2"
