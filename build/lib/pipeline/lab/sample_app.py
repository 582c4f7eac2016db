"""The sample app the integration tests build and deploy: busybox httpd serving a page and a
health file, in an image FROM scratch (Docker Hub is unreachable, see TESTBED.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
APP_PORT = 8080
DOCKERFILE = f"""\
FROM scratch
COPY busybox /bin/busybox
COPY www/ /www/
EXPOSE {APP_PORT}
# httpd as PID 1 would ignore SIGTERM (and make every stop wait for SIGKILL): a shell that
# forwards it lets the app stop at once, as a well-behaved app does.
CMD ["/bin/busybox", "sh", "-c", \
     "/bin/busybox httpd -f -p {APP_PORT} -h /www & trap 'kill $!; exit 0' TERM; wait"]
"""


def write_sample_app(workdir: Path, subdir: str = "web", content: str = "hello v1") -> Path:
    """Write the app's build context in workdir/subdir (index.html holds `content`); return it."""
    if not BUSYBOX.is_file():
        raise FileNotFoundError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    ctx = workdir / subdir
    (ctx / "www").mkdir(parents=True, exist_ok=True)
    # The build context cannot reach outside itself, so busybox is copied in.
    shutil.copy2(BUSYBOX, ctx / "busybox")
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    (ctx / "www" / "index.html").write_text(content)
    (ctx / "www" / "health").write_text("ok\n")
    return ctx
