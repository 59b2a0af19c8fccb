"""What neuroglancer shows of a store: ``tera view`` serves it on loopback together with the
neuroglancer package's bundled client, and headless chromium screenshots the printed offline
link. Nothing but 127.0.0.1 is contacted: chromium's background services are off and its host
resolver answers no other name. Chromium is driven over its DevTools protocol (loopback): wait
real seconds, then capture. ``chromium --screenshot --virtual-time-budget`` never returns here:
virtual time waits for open requests, and the client's event stream stays open.

python benchmarks/view_screenshot.py STORE --out DIR [--wait 20]

Needs ``pip install neuroglancer`` (the client) and Debian's chromium; prints JSON (the PNG, the
link, and what `tera view` answered).
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from output import emit  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
    "--no-default-browser-check", "--disable-background-networking", "--disable-sync",
    "--disable-component-update", "--disable-default-apps", "--disable-extensions",
    "--disable-domain-reliability", "--metrics-recording-only",
    "--safebrowsing-disable-auto-update",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--ignore-gpu-blocklist",
]  # fmt: skip
"""Headless, no traffic but loopback, and software WebGL 2 (neuroglancer draws with it)."""


def offline_link(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    """The offline neuroglancer link ``tera view`` prints (its bundled client)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("neuroglancer, offline"):
            link = line.split(": ", 1)[1].strip()
            if link.startswith("http://127.0.0.1"):
                return link
            sys.exit("the neuroglancer package is not installed: pip install neuroglancer")
    sys.exit(f"tera view printed no offline link: {proc.stderr.read() if proc.poll() else ''}")


def _devtools(profile: Path, timeout: float = 60.0) -> str:
    """The websocket of chromium's first page, once its DevTools port is up (loopback)."""
    deadline = time.monotonic() + timeout
    active = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if active.is_file() and len(active.read_text().split()) >= 2:
            port = active.read_text().split()[0]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as f:
                pages = [t for t in json.load(f) if t["type"] == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.2)
    sys.exit("chromium's DevTools did not come up")


def capture(browser: str, link: str, png: Path, wait_s: float, size: str) -> None:
    """Open ``link`` in headless chromium, wait ``wait_s`` seconds of real time (the viewer
    loads its chunks), save a screenshot."""
    from websockets.sync.client import connect

    with tempfile.TemporaryDirectory(prefix="tera-chromium-") as profile:
        args = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                f"--window-size={size}", "--remote-debugging-port=0", "about:blank"]  # fmt: skip
        chromium = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with connect(_devtools(Path(profile)), max_size=None) as ws:
                calls = iter(range(1, 1000))

                def call(method: str, **params: object) -> dict:
                    n = next(calls)
                    ws.send(json.dumps({"id": n, "method": method, "params": params}))
                    while True:
                        reply = json.loads(ws.recv(timeout=60))
                        if reply.get("id") == n:
                            return reply.get("result", {})

                call("Page.enable")
                call("Page.navigate", url=link)
                time.sleep(wait_s)
                shot = call("Page.captureScreenshot", format="png")
            png.write_bytes(base64.b64decode(shot["data"]))
        finally:
            chromium.terminate()
            try:
                chromium.wait(timeout=20)
            except subprocess.TimeoutExpired:
                chromium.kill()
                chromium.wait()


def screenshot(store: Path, out: Path, wait_s: float, size: str) -> dict:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("no chromium: apt-get install -y chromium")
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{store.name}.neuroglancer.png"
    view = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "view", str(store), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        link = offline_link(view)
        t0 = time.perf_counter()
        capture(browser, link, png, wait_s, size)
        seconds = time.perf_counter() - t0
    finally:
        view.send_signal(signal.SIGINT)
        try:
            rest = view.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            view.kill()
            rest = ""
    version = subprocess.run([browser, "--version"], capture_output=True, text=True).stdout
    return {
        "benchmark": "view_screenshot",
        "store": str(store),
        "png": str(png),
        "png_bytes": png.stat().st_size,
        "link": link,
        "chromium": version.strip(),
        "seconds": round(seconds, 1),
        "view_rc": view.returncode,
        "view_said": rest.strip().splitlines()[-1:],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="Folder of the PNG.")
    parser.add_argument("--wait", type=float, default=20.0, help="Seconds before the shot.")
    parser.add_argument("--window-size", default="1200,900")
    parser.add_argument("--json", type=Path, help="Also write the result here.")
    args = parser.parse_args()
    emit(screenshot(args.store, args.out, args.wait, args.window_size), args.json)
