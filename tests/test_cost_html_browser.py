"""`runner report --format html` opened in a real browser: headless Chromium (Debian's `chromium`).

The report of a constructed two-instance ledger (the one whose numbers test_cost_report.py checks by
hand) is written by the real CLI, then Chromium loads it from a file:// URL and
- dumps the rendered DOM: the timeline and cost charts are there as SVG with their bars, snapshot
  marks, interruption mark and both cost lines, and the totals table shows the hand-checked figures;
- records a NetLog: the page asked for nothing over the network (checked against a page that does);
- takes a 1280x2000 screenshot, decoded here pixel by pixel: the bars and lines were painted in
  their colours, which a blank page fails;
- lays the page out in a narrow window: the charts shrink to fit and no text overlaps another text
  or a bar.

Chromium is started with its background services off as far as flags allow, and with name resolution
and its proxy pointed nowhere, so nothing leaves the machine whatever the page or the browser asks for.
Without Chromium the tests skip, unless RUNNER_REQUIRE_BROWSER=1 (CI), when they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from runner.cost.ledger import LedgerWriter
from runner.storage import Store
from test_cost_report import Ledger

RUN = "exp1"
TIMEOUT_S = 60
SPOT_BLUE = (0x4C, 0x9B, 0xE8)  # render._COLORS["spot"]: a segment's bar
PAID_BLUE = (0x2E, 0x86, 0xC1)  # the cumulative cost line
ON_DEMAND_ORANGE = (0xE8, 0xA1, 0x4C)  # the on-demand line
# test_cost_report's hand-checked run: A $1/h for 1 h, preempted at step 1000 with the newest snapshot
# at 900; B resumes at 900, $2/h for 30 min, finishes at 1400; on-demand $4/h for both.
TOTALS = {"status": "finished", "total cost": "$2.00", "on-demand equivalent": "$6.00",
          "savings": "$4.00 (66.7%)", "interruptions": "1", "lost work": "100 steps, 0.1000 h, $0.1000",
          "steps": "1,400", "cost per 1,000 steps": "$1.43"}
LONG_IDS = {"a": ("p4d.24xlarge", "i-0a1b2c3d4e5f60718"), "b": ("p4d.24xlarge", "i-08f7e6d5c4b3a2910")}


def _find_chromium() -> str | None:
    for name in (os.environ.get("RUNNER_CHROMIUM"), "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = _find_chromium()
    if path is None:
        reason = "headless Chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get("RUNNER_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason}, and RUNNER_REQUIRE_BROWSER=1 requires it")
        pytest.skip(f"{reason}; RUNNER_REQUIRE_BROWSER=1 turns this skip into a failure")
    return path


def _browse(chromium: str, work: Path, page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = work / f"profile-{len(list(work.glob('profile-*')))}"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",  # nothing leaves the machine
           *args, page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def _write_ledger(bucket: Path, ids: dict[str, tuple[str, str]] | None = None) -> None:
    ids = ids or {}

    def start(ledger: Ledger, attempt: str, t: float, step: int, usd: float) -> Ledger:
        itype, iid = ids.get(attempt, ("g5.xlarge", f"i-{attempt}"))
        return ledger.start(attempt, t, step, usd=usd, od=4.0, instance_type=itype, instance_id=iid)

    ledger = start(Ledger(), "a", 0, 0, 1.0)
    (ledger.add("a", "snapshot", 3240, step=900, reason="periodic", stall_s=2.0, write_s=5.0, snapshot_id="s900")
     .add("a", "heartbeat", 3590, step=1000)
     .add("a", "end", 3600, reason="preempted-unsaved", step=1000, exit_code=75))
    start(ledger, "b", 3600, 900, 2.0)
    (ledger.add("b", "snapshot", 5400, step=1400, reason="final", stall_s=1.0, write_s=1.0, snapshot_id="s1400")
     .add("b", "end", 5400, reason="finished", step=1400, exit_code=0))
    store = Store(str(bucket))
    writers: dict[str, LedgerWriter] = {}
    for e in ledger.events:
        writer = writers.setdefault(e.attempt, LedgerWriter(store, RUN, attempt=e.attempt))
        writer.write(e.kind, e.data, at=e.time, seq=e.seq)
        assert writer.failures == 0


def _html_report(tmp_path: Path, ids: dict[str, tuple[str, str]] | None = None) -> Path:
    bucket, out = tmp_path / "bucket", tmp_path / "report.html"
    _write_ledger(bucket, ids)
    cmd = [sys.executable, "-m", "runner", "report", "--bucket", str(bucket), "--run-id", RUN, "--offline",
           "--format", "html", "--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr
    return out


# -- the rendered DOM ---------------------------------------------------------------


class _Dom(HTMLParser):
    """Elements with their attributes, the svg each one is in, and the totals table's rows."""

    RESOURCE_ATTRS = ("src", "href", "xlink:href", "srcset", "poster", "data", "action", "formaction", "background")

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], str | None]] = []  # (tag, attrs, enclosing svg id)
        self.totals: dict[str, str] = {}
        self.external: list[str] = []
        self._svg: str | None = None
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._row: list[str] = []
        self._style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "svg":
            self._svg = a.get("id", "")
        self.elements.append((tag, a, self._svg))
        if tag == "table":
            self._table = a.get("id") or a.get("class")
        elif tag == "tr":
            self._row = []
        elif tag in ("th", "td"):
            self._cell = []
        elif tag == "style":
            self._style = True
        for name, value in a.items():
            if name in self.RESOURCE_ATTRS and value and not value.startswith(("#", "data:")):
                self.external.append(f"{tag} {name}={value}")
            if name == "style" and "url(" in value:
                self.external.append(f"{tag} style={value}")
        if tag in ("script", "link", "iframe", "object", "embed", "img", "image", "use", "base"):
            self.external.append(f"<{tag}>")  # the report needs none: a chart is inline SVG drawn in place

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._svg = None
        elif tag in ("th", "td") and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._table == "totals" and len(self._row) == 2:
            self.totals[self._row[0]] = self._row[1]
        elif tag == "table":
            self._table = None
        elif tag == "style":
            self._style = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._style and ("url(" in data or "@import" in data):
            self.external.append(f"style: {data.strip()[:80]}")

    def find(self, tag: str, cls: str | None = None, svg: str | None = None) -> list[dict[str, str]]:
        return [a for t, a, s in self.elements
                if t == tag and (cls is None or cls in a.get("class", "").split()) and (svg is None or s == svg)]


def _page_requests(netlog: Path) -> list[str]:
    """URLs the page (a file:// document) asked the network stack for, from a Chromium NetLog.

    The browser's own requests (it has a few even with background networking off) carry no file://
    network isolation key; the page's do.
    """
    text = netlog.read_text()
    try:
        log = json.loads(text)
    except ValueError:  # a NetLog cut short lacks its closing brackets
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    kinds = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        if kinds.get(event.get("type")) == "URL_REQUEST_START_JOB" and "file://" in params.get(
                "network_isolation_key", "") and not params.get("url", "").startswith(("file:", "data:")):
            urls.append(params["url"])
    return urls


def test_the_report_renders_its_charts_and_totals_and_loads_nothing(chromium, tmp_path) -> None:
    page = _html_report(tmp_path)
    netlog = tmp_path / "netlog.json"
    done = _browse(chromium, tmp_path, page, f"--log-net-log={netlog}", "--dump-dom")
    dom = _Dom()
    dom.feed(done.stdout)

    assert [s.get("id") for s in dom.find("svg")] == ["timeline", "cost-chart"]
    bars = dom.find("rect", "segment", svg="timeline")
    assert len(bars) == 2 and all(float(b["width"]) > 100 for b in bars)
    assert {b["fill"].upper() for b in bars} == {"#%02X%02X%02X" % SPOT_BLUE}
    assert len(dom.find("line", "snapshot", svg="timeline")) == 2  # s900 in A, s1400 in B
    assert len(dom.find("text", "interruption", svg="timeline")) == 1  # A was preempted
    for cls in ("actual", "on-demand"):
        (line,) = dom.find("path", cls, svg="cost-chart")
        assert line["d"].startswith("M") and line["d"].count("L") >= 2  # a start, the switch, the end
    for name, value in TOTALS.items():
        assert dom.totals.get(name) == value, (name, dom.totals)
    assert "paid $2.00" in done.stdout and "on-demand $6.00" in done.stdout  # the cost chart's legend

    assert not dom.external, dom.external
    assert _page_requests(netlog) == []


def test_the_request_check_sees_a_page_that_loads_something(chromium, tmp_path) -> None:
    """The NetLog check above is not vacuous: a page with one remote image is caught."""
    page = tmp_path / "remote.html"
    page.write_text('<!DOCTYPE html><html><body><img src="http://example.invalid/x.png"></body></html>')
    netlog = tmp_path / "netlog.json"
    _browse(chromium, tmp_path, page, f"--log-net-log={netlog}", "--dump-dom")
    assert _page_requests(netlog) == ["http://example.invalid/x.png"]


# -- the screenshot -----------------------------------------------------------------------


def _decode_png(data: bytes) -> np.ndarray:
    """An 8-bit, non-interlaced RGB(A) PNG as a (height, width, channels) array."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert header is not None, "no IHDR"
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    assert len(raw) == height * (stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int64)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)]
        cur = np.frombuffer(line, dtype=np.uint8).astype(np.int64)
        if kind == 1:  # Sub: a running sum per channel
            cur = np.cumsum(cur.reshape(width, bpp), axis=0).reshape(-1) % 256
        elif kind == 2:  # Up
            cur = (cur + prev) % 256
        elif kind in (3, 4):  # Average, Paeth: each byte depends on the one decoded before it
            row, up = list(line), prev.tolist()
            for i in range(stride):
                left = row[i - bpp] if i >= bpp else 0
                if kind == 3:
                    row[i] = (row[i] + (left + up[i]) // 2) & 255
                else:
                    upleft = up[i - bpp] if i >= bpp else 0
                    p = left + up[i] - upleft
                    pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - upleft)
                    row[i] = (row[i] + (left if pa <= pb and pa <= pc else up[i] if pb <= pc else upleft)) & 255
            cur = np.array(row, dtype=np.int64)
        else:
            assert kind == 0, f"row {y}: filter {kind}"
        out[y], prev = cur, cur
    return out.reshape(height, width, bpp)[:, :, :3]


def _near(image: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 24) -> int:
    return int((np.abs(image.astype(np.int16) - np.array(rgb, dtype=np.int16)).max(axis=2) <= tolerance).sum())


def test_the_screenshot_shows_the_bars_and_both_cost_lines(chromium, tmp_path) -> None:
    page = _html_report(tmp_path)
    shot = tmp_path / "report.png"
    _browse(chromium, tmp_path, page, f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1280, 2000)
    image = _decode_png(data)
    assert image.shape == (2000, 1280, 3)
    ink = int((image.min(axis=2) < 200).sum())
    assert ink > 20_000, f"only {ink} non-white pixels: a blank page?"
    # Two bars of about 1/3 and 1/6 of a 730 px axis, 18 px high; the lines are 2-2.5 px wide.
    assert _near(image, SPOT_BLUE, tolerance=8) > 5_000
    assert _near(image, PAID_BLUE) > 500
    assert _near(image, ON_DEMAND_ORANGE) > 300


# -- layout in a narrow window --------------------------------------------------------------

_PROBE = """<script>
(() => {
  const box = (el) => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const svgs = [...document.querySelectorAll("svg")].map((svg) => ({
    id: svg.id, box: box(svg),
    texts: [...svg.querySelectorAll(":scope > text:not(.interruption)")]
      .map((t) => ({text: t.textContent, box: box(t)})),
    bars: [...svg.querySelectorAll("rect.segment")].map(box),
  }));
  document.body.setAttribute("data-layout", JSON.stringify({
    viewport: document.documentElement.clientWidth, scroll: document.documentElement.scrollWidth, svgs}));
})();
</script></body>"""


def _overlap(a: list[float], b: list[float]) -> bool:
    return a[0] < b[2] - 0.5 and b[0] < a[2] - 0.5 and a[1] < b[3] - 0.5 and b[1] < a[3] - 0.5


@pytest.mark.parametrize("width", [1280, 640])
def test_charts_fit_the_window_and_no_text_overlaps(chromium, tmp_path, width) -> None:
    """Measured by the browser (a probe script added to a copy of the page; the report has none).

    Long instance names (p4d.24xlarge i-0a1b2c3d4e5f60718) make the widest row labels there are.
    """
    page = _html_report(tmp_path, LONG_IDS)
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", _PROBE, 1))
    done = _browse(chromium, tmp_path, probed, f"--window-size={width},1200", "--dump-dom")
    dom = _Dom()
    dom.feed(done.stdout)
    (body,) = dom.find("body")
    layout = json.loads(body["data-layout"])
    assert layout["scroll"] <= layout["viewport"], f"the page scrolls sideways at {width} px: {layout['scroll']}"
    assert [s["id"] for s in layout["svgs"]] == ["timeline", "cost-chart"]
    for svg in layout["svgs"]:
        left, top, right, bottom = svg["box"]
        assert right <= layout["viewport"], (svg["id"], svg["box"])
        texts = svg["texts"]  # all but the interruption mark, which sits on the end of its bar
        assert texts
        for i, t in enumerate(texts):
            tl, tt, tr, tb = t["box"]
            assert left - 0.5 <= tl and tr <= right + 0.5 and top - 0.5 <= tt and tb <= bottom + 0.5, (svg["id"], t)
            for other in texts[i + 1:]:
                assert not _overlap(t["box"], other["box"]), (svg["id"], t, other)
            for bar in svg["bars"]:
                assert not _overlap(t["box"], bar), (svg["id"], t, bar)
