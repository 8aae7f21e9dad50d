"""Check that a report page renders: a headless Chromium screenshot of it.

    python -m loadtest.render_check runs/<run>/report.html [screenshot.png]

Debian/Ubuntu: ``apt-get install -y chromium``. The browser runs offline in a throw-away profile;
a page that needs the network (it should not: everything is inlined) still renders without it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from autoglm.errors import AutoGLMError, MissingExtraError

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "apt-get install -y chromium"


def find_chromium() -> str:
    """Path of a Chromium-family browser; MissingExtraError naming the package otherwise."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise MissingExtraError(f"no Chromium found (looked for {', '.join(BROWSERS)}): install it with `{INSTALL_HINT}`")


def screenshot(page: Path, png: Path, width: int = 1200, height: int = 2000, timeout_s: float = 90) -> Path:
    """Render ``page`` headless and write a PNG screenshot; AutoGLMError when nothing (or an empty file) comes out."""
    page, png = Path(page).absolute(), Path(png).absolute()
    if not page.is_file():
        raise AutoGLMError(f"{page} does not exist: write the report first (autoglm loadtest)")
    browser = find_chromium()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="autoglm-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={width},{height}",
               page.as_uri()]
        try:
            done = subprocess.run(cmd, capture_output=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise AutoGLMError(f"Chromium did not finish rendering {page} within {timeout_s:g} s") from exc
    if not png.is_file() or png.stat().st_size == 0:
        tail = done.stderr.decode(errors="replace")[-1500:]
        raise AutoGLMError(f"Chromium exited with code {done.returncode} and wrote no screenshot of {page}:\n{tail}")
    return png


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    page = Path(args[0])
    png = Path(args[1]) if len(args) > 1 else page.with_suffix(".png")
    try:
        out = screenshot(page, png)
    except AutoGLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"rendered {page} -> {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
