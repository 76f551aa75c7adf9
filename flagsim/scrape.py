"""Scrape Wikipedia's list of national flags into image files, an images table and errors.csv."""

from __future__ import annotations

import contextlib
import csv
import email.utils
import hashlib
import io
import ipaddress
import logging
import random
import re
import signal
import socket
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import pyarrow as pa
import requests
import urllib3
from bs4 import BeautifulSoup
from bs4.element import Tag
from PIL import Image, ImageOps, UnidentifiedImageError

from flagsim import __version__
from flagsim.errors import ConfigError, DataError, Terminated
from flagsim.images import ImageInfo, probe_image, table_from_rows, unique_stems, write_images_table
from flagsim.inputfiles import read_regular
from flagsim.rundir import RunDir
from flagsim.storage import Location

log = logging.getLogger(__name__)

DEFAULT_URL = "https://en.wikipedia.org/wiki/List_of_national_flags_of_sovereign_states"
DEFAULT_WIDTH = 512
DEFAULT_USER_AGENT = (
    f"flagsim/{__version__} (national-flag image scraper; no contact given, see --user-agent) "
    f"python-requests/{requests.__version__}"
)
#: Widths upload.wikimedia.org renders; other widths are refused (HTTP 429) since 2025/26.
WIKIMEDIA_THUMB_STEPS = (20, 40, 60, 120, 250, 330, 500, 960, 1280, 1920, 3840)
#: Columns of `errors.csv`.
ERRORS_CSV_COLUMNS = ("image_id", "name", "table", "url", "status", "reason", "detail", "attempts")
#: Query parameters dropped from image URLs (plus every `utm_*`).
TRACKING_PARAMS = frozenset({"wprov", "fbclid", "gclid", "mc_cid", "mc_eid", "_hsenc", "_hsmi"})

SOVEREIGN = "sovereign"
DE_FACTO = "de facto"

_FOOTNOTE_RE = re.compile(r"\[[^\[\]]{1,24}\]")
_DE_FACTO_RE = re.compile(
    r"de[\s_-]*facto|limited[\s_-]+recognition|unrecogni[sz]ed|partially[\s_-]+recogni[sz]ed",
    re.IGNORECASE,
)
_THUMB_SEGMENT_RE = re.compile(r"^((?:[a-z0-9]+-)*?)(\d+)px-(.+)$")
_REDIRECTS = (301, 302, 303, 307, 308)
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)
_PAGE_MAX_BYTES = 64 * 1024 * 1024
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
#: Largest colspan honoured (HTML allows 1000); a rowspan is clipped to the rows left.
MAX_SPAN = 100
#: Largest table grid (rows x columns after spans) parsed; real flag tables are ~1000.
MAX_GRID_CELLS = 200_000


# --------------------------------------------------------------------------------------------
# Options and results
# --------------------------------------------------------------------------------------------
DAY_S = 86_400  # the longest timeout or wait an option may ask for (time_t overflows near 1e9)


@dataclass(frozen=True)
class ScrapeOptions:
    """Everything `scrape` needs besides the output location; validated on creation."""

    url: str = DEFAULT_URL
    width: int = DEFAULT_WIDTH
    exact_width: bool = False  # False: snap to WIKIMEDIA_THUMB_STEPS on Wikimedia hosts
    de_facto: bool = False  # also the de facto states table(s)
    extra_flags: bool = False  # also a state's second and later flags
    concurrency: int = 4
    timeout: float = 30.0  # seconds: connecting, and each wait for data
    deadline: float | None = None  # seconds for one whole attempt (None: `timeout`)
    max_bytes: int = 10 * 1024 * 1024  # per image body
    retries: int = 3  # further attempts after a 429, 5xx, timeout or connection error
    backoff: float = 1.0  # first wait before a retry (doubles each time, with jitter)
    max_wait: float = 60.0  # cap on any single wait, Retry-After included
    max_redirects: int = 5
    user_agent: str = DEFAULT_USER_AGENT
    allow_private: bool = False  # allow loopback/private/link-local addresses (tests only)
    allow_hosts: tuple[str, ...] = ()  # hosts allowed even when their address is private
    max_pixels: int = 50_000_000  # decompression-bomb limit per image

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.width < 1 or self.width > 10_000, f"--width must be 1..10000, got {self.width}"),
            (self.concurrency < 1 or self.concurrency > 64, "--concurrency must be 1..64"),
            (not 0 < self.timeout <= DAY_S, f"--timeout must be 0 < s <= {DAY_S}, got {self.timeout}"),
            (
                self.deadline is not None and not 0 < self.deadline <= DAY_S,
                f"--deadline must be 0 < s <= {DAY_S}, got {self.deadline}",
            ),
            (self.max_bytes < 1, f"--max-bytes must be positive, got {self.max_bytes}"),
            (self.retries < 0 or self.retries > 20, "--retries must be 0..20"),
            (not 0 <= self.backoff <= DAY_S, f"--backoff must be 0..{DAY_S} s, got {self.backoff}"),
            (not 0 <= self.max_wait <= DAY_S, f"--max-wait must be 0..{DAY_S} s, got {self.max_wait}"),
            (self.max_redirects < 0, "max_redirects must not be negative"),
            (not self.user_agent.strip(), "--user-agent must not be empty"),
            (any(c in self.user_agent for c in "\r\n"), "--user-agent must be one line"),
        ]
        for bad, message in checks:
            if bad:
                raise ConfigError(message)
        try:
            parts = urlsplit(self.url)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:  # e.g. "Invalid IPv6 URL"
            ok = False
        if not ok:
            raise ConfigError(f"--url must be an http(s) URL, got {self.url!r}")

    @property
    def attempt_deadline(self) -> float:
        """Seconds one attempt (redirects, headers and body) may take in all."""
        return self.timeout if self.deadline is None else self.deadline


@dataclass(frozen=True)
class FlagEntry:
    """One flag image listed on the page."""

    state: str  # the state's name, footnote markers removed, NFC
    image_url: str  # absolute http(s) URL of the page's thumbnail, tracking parameters removed
    table: str  # SOVEREIGN or DE_FACTO
    flag_number: int  # 1 for the state's first (main) flag, 2, 3... for further flags

    @property
    def name(self) -> str:
        """Display name: the state for its main flag, `State (2)` for its second flag..."""
        return self.state if self.flag_number == 1 else f"{self.state} ({self.flag_number})"


@dataclass(frozen=True)
class PlannedImage:
    entry: FlagEntry
    image_id: str  # safe, unique file stem
    fetch_url: str | None  # None when the page's URL is unusable


@dataclass
class ScrapeResult:
    table: pa.Table
    errors: list[dict]
    listed: int
    downloaded: int = 0  # fetched and written
    unchanged: int = 0  # fetched, same bytes as the file already there
    reused: int = 0  # not fetched: file and table already matched
    images_table: Location | None = None
    errors_csv: Location | None = None
    skipped_extra: list[str] = field(default_factory=list)


class FetchError(Exception):
    """One failed download: `reason` is a short category, `detail` the specifics."""

    def __init__(
        self,
        reason: str,
        detail: str = "",
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.attempts = 1


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------
def clean_name(cell: Tag) -> str:
    """The visible text of a name cell: footnote markers, hidden sort keys and spacing removed."""
    for sup in cell.find_all("sup"):
        classes = sup.get("class") or []
        if "reference" in classes or _FOOTNOTE_RE.fullmatch(sup.get_text().strip()):
            sup.decompose()
    for hidden in cell.find_all(style=re.compile(r"display\s*:\s*none", re.I)):
        hidden.decompose()
    for hidden in cell.find_all(class_="sortkey"):
        hidden.decompose()
    for br in cell.find_all("br"):
        br.replace_with(" ")
    text = _FOOTNOTE_RE.sub("", cell.get_text())
    return unicodedata.normalize("NFC", " ".join(text.split()))


def clean_image_url(src: str, base_url: str) -> str | None:
    """`src` made absolute against the page, without fragment or tracking parameters.

    None for anything but http(s) (data: URIs, javascript:, ...).
    """
    try:
        url = urljoin(base_url, src.strip())
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
    except ValueError:  # unparseable (e.g. "Invalid IPv6 URL"): the caller's "bad url" row
        return None
    query = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if not k.lower().startswith("utm_") and k.lower() not in TRACKING_PARAMS
    ]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


class MalformedTable(ValueError):
    """A table whose rowspan/colspan grid would be unreasonably large."""


def _span(cell: Tag, attr: str, limit: int) -> int:
    m = re.match(r"\s*(\d+)", str(cell.get(attr) or ""))
    return min(max(int(m.group(1)), 1), limit) if m else 1


def table_grid(table: Tag) -> list[list[Tag | None]]:
    """The table's rows with `rowspan`/`colspan` cells repeated into every slot they cover.

    A colspan is clipped to MAX_SPAN and a rowspan to the table's remaining rows; a grid of
    more than MAX_GRID_CELLS slots raises MalformedTable (no real list of flags comes close).
    """
    rows = [tr for tr in table.find_all("tr") if tr.find_parent("table") is table]
    pending: dict[int, tuple[Tag, int]] = {}  # column -> (cell, rows still covered)
    grid: list[list[Tag | None]] = []
    size = 0

    def take_pending(row: list[Tag | None]) -> None:
        col = len(row)
        cell, left = pending.pop(col)
        row.append(cell)
        if left > 1:
            pending[col] = (cell, left - 1)

    for r, tr in enumerate(rows):
        row: list[Tag | None] = []
        for new in tr.find_all(["td", "th"], recursive=False):
            while len(row) in pending:
                take_pending(row)
            rowspan = _span(new, "rowspan", len(rows) - r)
            colspan = _span(new, "colspan", MAX_SPAN)
            if size + len(row) + colspan > MAX_GRID_CELLS:
                raise MalformedTable(_too_large(len(rows)))
            for _ in range(colspan):
                if rowspan > 1:
                    pending[len(row)] = (new, rowspan - 1)
                row.append(new)
        last = max(pending, default=-1)  # spanned cells further right
        if size + last + 1 > MAX_GRID_CELLS:
            raise MalformedTable(_too_large(len(rows)))
        while len(row) <= last:
            if len(row) in pending:
                take_pending(row)
            else:
                row.append(None)
        size += len(row)
        grid.append(row)
    return grid


def _too_large(rows: int) -> str:
    return (
        f"its rowspan/colspan cells cover more than {MAX_GRID_CELLS} slots in {rows} rows "
        "(malformed table)"
    )


def _is_header_row(row: list[Tag | None]) -> bool:
    cells = [c for c in row if c is not None]
    return bool(cells) and all(c.name == "th" and c.get("scope") != "row" for c in cells)


def _columns(grid: list[list[Tag | None]]) -> tuple[int, int, int] | None:
    """(flag column, state column, index of the first body row), or None if not a flag table."""
    for i, row in enumerate(grid):
        if not _is_header_row(row):
            continue
        flag_col = state_col = None
        for j, cell in enumerate(row):
            text = " ".join(cell.get_text().split()).lower() if cell is not None else ""
            if flag_col is None and text.startswith("flag"):
                flag_col = j
            elif state_col is None and (
                text.startswith("state") or text.startswith("country") or text == "name"
            ):
                state_col = j
        if flag_col is not None and state_col is not None:
            body = i + 1
            while body < len(grid) and _is_header_row(grid[body]):
                body += 1
            return flag_col, state_col, body
    return None


def _table_kind(table: Tag) -> str:
    caption = table.find("caption")
    heading = table.find_previous(["h2", "h3", "h4"])
    text = " ".join(t.get_text() for t in (caption, heading) if t is not None)
    return DE_FACTO if _DE_FACTO_RE.search(text) else SOVEREIGN


def parse_flag_tables(html: str, base_url: str) -> list[FlagEntry]:
    """Every flag in every flag table of the page, in page order.

    A flag table is a `wikitable` whose header row has a `Flag...` and a `State`/`Country`
    column. It holds de facto states when its caption or the heading above it says so.
    Rowspans are expanded; a state's flags are numbered in order (1 = its main flag).
    """
    soup = BeautifulSoup(html, "html.parser")
    base = soup.find("base", href=True)
    if isinstance(base, Tag):  # <base href>: what relative srcs resolve against
        try:
            base_url = urljoin(base_url, str(base["href"]))
        except ValueError:
            pass
    entries: list[FlagEntry] = []
    numbers: dict[str, int] = {}
    names: dict[int, str] = {}
    nameless = 0
    for number, table in enumerate(soup.find_all("table"), start=1):
        if "wikitable" not in (table.get("class") or []):
            continue
        try:
            grid = table_grid(table)
        except MalformedTable as exc:
            log.warning("skipping table %d of the page: %s", number, exc)
            continue
        cols = _columns(grid)
        if cols is None:
            log.debug("skipping a wikitable without Flag and State columns")
            continue
        flag_col, state_col, body = cols
        kind = _table_kind(table)
        seen_flag_cells: set[int] = set()
        for row in grid[body:]:
            if _is_header_row(row) or max(flag_col, state_col) >= len(row):
                continue
            state_cell, flag_cell = row[state_col], row[flag_col]
            if state_cell is None or flag_cell is None or id(flag_cell) in seen_flag_cells:
                continue  # a flag cell spanning several rows counts once
            seen_flag_cells.add(id(flag_cell))
            if id(state_cell) not in names:
                names[id(state_cell)] = clean_name(state_cell)
            state = names[id(state_cell)]
            if not state:
                nameless += bool(flag_cell.find("img"))
                continue
            for img in flag_cell.find_all("img"):
                src, url = _image_src(img, base_url)
                numbers[state] = numbers.get(state, 0) + 1
                entries.append(FlagEntry(state, url or src, kind, numbers[state]))
    if nameless:
        log.warning("%d flag(s) in the page's tables have no state name beside them; skipped",
                    nameless)
    return entries


def _image_src(img: Tag, base_url: str) -> tuple[str, str | None]:
    """(the src as written, its cleaned absolute URL or None): `src`, else a lazy-loading
    image's `data-src` when `src` is a placeholder (a `data:` URI) or missing."""
    candidates = [str(img.get(a) or "").strip() for a in ("src", "data-src")]
    for src in candidates:
        url = clean_image_url(src, base_url) if src else None
        if url:
            return src, url
    return next((c for c in candidates if c), ""), None


def select_entries(
    entries: Iterable[FlagEntry], de_facto: bool = False, extra_flags: bool = False
) -> list[FlagEntry]:
    """Sovereign states first, then (optionally) de facto states; main flags unless extra_flags."""
    kept = [e for e in entries if extra_flags or e.flag_number == 1]
    out = [e for e in kept if e.table == SOVEREIGN]
    if de_facto:
        out += [e for e in kept if e.table == DE_FACTO]
    return out


# --------------------------------------------------------------------------------------------
# URLs and hosts
# --------------------------------------------------------------------------------------------
def nearest_step(width: int, steps: Iterable[int] = WIKIMEDIA_THUMB_STEPS) -> int:
    """The step closest to `width` (the larger one on a tie)."""
    return min(steps, key=lambda s: (abs(s - width), -s))


def is_wikimedia_upload(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return host == "upload.wikimedia.org"


def thumbnail_url(url: str, width: int, exact: bool = False) -> str:
    """`url` asking for a `width`-px thumbnail (`.../thumb/a/ab/F.svg/250px-F.svg.png`).

    URLs that are not MediaWiki thumbnails are returned unchanged. On upload.wikimedia.org the
    width is snapped to the nearest of WIKIMEDIA_THUMB_STEPS unless `exact`.
    """
    parts = urlsplit(url)
    if "/thumb/" not in parts.path:
        return url
    head, _, last = parts.path.rpartition("/")
    m = _THUMB_SEGMENT_RE.match(last)
    if not m:
        return url
    if not exact and is_wikimedia_upload(url):
        width = nearest_step(width)
    path = f"{head}/{m.group(1)}{width}px-{m.group(3)}"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


class HostPolicy:
    """Refuses non-http(s) URLs and hosts whose addresses are not public, unless allowed."""

    def __init__(self, allow_private: bool = False, allow_hosts: Iterable[str] = ()) -> None:
        self.allow_private = allow_private
        self.allow_hosts = {h.strip().lower().strip("[]") for h in allow_hosts if h.strip()}
        self._cache: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def _addresses(self, host: str) -> list[str]:
        with self._lock:
            if host in self._cache:
                return self._cache[host]
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as exc:
            raise FetchError("dns error", f"cannot resolve {host}: {exc}", retryable=True) from None
        addrs = sorted({str(info[4][0]).split("%", 1)[0] for info in infos})
        with self._lock:
            self._cache[host] = addrs
        return addrs

    def check(self, url: str, what: str = "URL") -> None:
        """Raise FetchError unless `url` is http(s) on an allowed host."""
        try:
            parts = urlsplit(url)
            parts.hostname  # noqa: B018 - parsing the netloc is what may fail
        except ValueError as exc:
            raise FetchError("bad url", f"{what} {url} cannot be parsed: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise FetchError("scheme refused", f"{what} {url} is not http(s)")
        host = (parts.hostname or "").lower()
        if not host:
            raise FetchError("bad url", f"{what} {url} has no host")
        if host in self.allow_hosts or self.allow_private:
            return
        for addr in self._addresses(host):
            ip = ipaddress.ip_address(addr)
            mapped = getattr(ip, "ipv4_mapped", None)
            ip = mapped or ip
            if not ip.is_global or ip.is_multicast:
                raise FetchError(
                    "host refused",
                    f"{what} {url}: {host} is a non-public address ({addr}); "
                    "use --allow-host/--allow-private to allow it",
                )


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def retry_delay(attempt: int, retry_after: float | None, backoff: float, cap: float) -> float:
    """Wait before retry number `attempt + 1`: Retry-After if given, else jittered backoff."""
    if retry_after is not None:
        return min(retry_after, cap)
    return min(backoff * (2**attempt) * (1 + 0.25 * random.random()), cap)


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------
class _HostGate:
    """Shared per-host pause: after a 429 with Retry-After, every worker waits it out."""

    def __init__(self, stopped: threading.Event | None = None) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stopped = stopped or threading.Event()

    def hold(self, host: str, seconds: float) -> None:
        with self._lock:
            self._until[host] = max(self._until.get(host, 0.0), time.monotonic() + seconds)

    def wait(self, host: str) -> None:
        while True:
            with self._lock:
                left = self._until.get(host, 0.0) - time.monotonic()
            if left <= 0 or self._stopped.wait(min(left, 1.0)):
                return


@dataclass
class Fetched:
    body: bytes
    content_type: str
    final_url: str
    attempts: int


class Fetcher:
    """HTTP GETs with safety checks, size cap, timeouts and retries; one Session per thread."""

    def __init__(self, opts: ScrapeOptions, sleep: Callable[[float], None] | None = None) -> None:
        self.opts = opts
        self.policy = HostPolicy(opts.allow_private, opts.allow_hosts)
        self.stopped = threading.Event()  # set on an interrupt: no new attempt, no back-off wait
        self.gate = _HostGate(self.stopped)
        self._sleep = sleep or self.stopped.wait
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.headers["User-Agent"] = self.opts.user_agent
            s.headers["Accept"] = "image/png,image/*;q=0.9,*/*;q=0.5"
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def stop(self) -> None:
        """End every retry loop and back-off now (an interrupt); requests in flight finish."""
        self.stopped.set()

    def close(self) -> None:
        with self._lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()

    def get(self, url: str, max_bytes: int, accept: str | None = None) -> Fetched:
        """GET `url`, retrying 429/5xx/timeouts/connection errors; raises FetchError."""
        host = (urlsplit(url).hostname or "").lower()
        for attempt in range(self.opts.retries + 1):
            self.gate.wait(host)
            if self.stopped.is_set():
                raise FetchError("interrupted", "the download was stopped before this attempt")
            try:
                fetched = self._once(url, max_bytes, accept)
                fetched.attempts = attempt + 1
                return fetched
            except FetchError as exc:
                exc.attempts = attempt + 1
                if not exc.retryable or attempt >= self.opts.retries:
                    raise
                delay = retry_delay(attempt, exc.retry_after, self.opts.backoff, self.opts.max_wait)
                if exc.status == 429 and exc.retry_after is not None:
                    self.gate.hold(host, delay)
                log.debug("retrying %s in %.2f s after %s", url, delay, exc)
                self._sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _once(self, url: str, max_bytes: int, accept: str | None) -> Fetched:
        opts = self.opts
        current = url
        headers = {"Accept": accept} if accept else None
        deadline = time.monotonic() + opts.attempt_deadline
        for hop in range(opts.max_redirects + 1):
            self.policy.check(current, "redirect to" if hop else "URL")
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._deadline_error(None, 0)
            wait_s = min(opts.timeout, left)
            try:
                resp = self.session().get(
                    current,
                    headers=headers,
                    allow_redirects=False,
                    stream=True,
                    timeout=(wait_s, wait_s),
                )
            except requests.Timeout:
                raise FetchError("timeout", f"no answer within {wait_s:.3g} s",
                                 retryable=True) from None
            except requests.ConnectionError as exc:
                raise FetchError("connection error", _network_detail(exc),
                                 retryable=True) from None
            except requests.RequestException as exc:
                raise FetchError("request error", _short(exc)) from None
            with resp:
                status = resp.status_code
                if status in _REDIRECTS and resp.headers.get("Location"):
                    target = urljoin(current, resp.headers["Location"])
                    if urlsplit(target).scheme not in ("http", "https"):
                        raise FetchError(
                            "redirect refused", f"{status} to non-http(s) {target}", status=status
                        )
                    try:
                        self.policy.check(target, "redirect to")
                    except FetchError as exc:
                        exc.status = status
                        raise
                    current = target
                    continue
                if status == 429 or 500 <= status <= 599:
                    raise FetchError(
                        f"http {status}",
                        _http_detail(resp, current, url),
                        status=status,
                        retryable=True,
                        retry_after=parse_retry_after(resp.headers.get("Retry-After")),
                    )
                if status != 200:
                    raise FetchError(
                        f"http {status}", _http_detail(resp, current, url), status=status
                    )
                declared = resp.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise FetchError(
                        "too large",
                        f"Content-Length {declared} > limit {max_bytes} bytes",
                        status=status,
                    )
                body = self._read(resp, max_bytes, deadline, status)
                return Fetched(body, resp.headers.get("Content-Type", ""), current, 1)
        raise FetchError("too many redirects", f"more than {opts.max_redirects} from {url}")

    def _read(
        self, resp: requests.Response, max_bytes: int, deadline: float, status: int
    ) -> bytes:
        """The body, read as it arrives so that `deadline` holds however slowly it comes.

        Each read returns what one receive got (urllib3's `read1`), so a server sending a byte
        now and then is abandoned at the deadline (at most one `timeout` after it).
        """
        raw = resp.raw
        read1 = getattr(raw, "read1", None)  # urllib3 >= 2.3
        buf = bytearray()
        try:
            while True:
                if time.monotonic() > deadline:
                    raise self._deadline_error(status, len(buf))
                if read1 is not None:
                    chunk = read1(64 * 1024, decode_content=True)
                else:  # pragma: no cover - older urllib3: blocks until 4 KiB or the end
                    chunk = raw.read(4096, decode_content=True)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > max_bytes:
                    raise FetchError(
                        "too large", f"body exceeds limit {max_bytes} bytes", status=status
                    )
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            text = _short(exc)
            timed_out = isinstance(exc, (urllib3.exceptions.TimeoutError, TimeoutError))
            if timed_out or "timed out" in text.lower():
                raise FetchError("timeout", f"no data for {self.opts.timeout:g} s after "
                                 f"{len(buf)} bytes of the body", status=status,
                                 retryable=True) from None
            raise FetchError("connection error", _network_detail(exc), status=status,
                             retryable=True) from None
        return bytes(buf)

    def _deadline_error(self, status: int | None, received: int) -> FetchError:
        return FetchError(
            "deadline exceeded",
            f"response not complete within the {self.opts.attempt_deadline:g} s deadline "
            f"(--deadline); {received} bytes received",
            status=status,
            retryable=True,
        )


def _http_detail(resp: requests.Response, current: str, requested: str) -> str:
    where = f" (after redirects, at {current})" if current != requested else ""
    return f"{resp.reason or 'no reason given'}{where}"


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300]


def _network_detail(exc: BaseException) -> str:
    """A connection failure in words, not the reprs requests and urllib3 nest (`('Connection
    broken: IncompleteRead(50 bytes read, 250 more expected)', IncompleteRead(...))`,
    `HTTPConnectionPool(host=..., port=1): Max retries exceeded ... NewConnectionError(...)`)."""
    text = _short(exc)
    if m := re.search(r"IncompleteRead\((\d+) bytes read, (\d+) more expected\)", text):
        return f"connection closed mid-body ({m[1]} bytes read, {m[2]} more expected)"
    if m := re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text):
        return m[1].strip().rstrip(".")
    if "RemoteDisconnected" in text or "closed connection without response" in text:
        return "the server closed the connection without a response"
    if "Connection reset by peer" in text:
        return "connection reset by the server"
    return text


_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})


def check_image(body: bytes, content_type: str = "", max_pixels: int = 50_000_000) -> bytes:
    """PNG bytes for `body` if it is a complete PNG/JPEG/GIF/WebP image; raise FetchError if not.

    Checks the magic number, then PIL `verify()` and a full decode. Non-PNG images are
    re-encoded losslessly as PNG (the files are always `.png`).
    """
    kind = next((fmt for magic, fmt in _MAGIC if body.startswith(magic)), None)
    if kind is None and body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        kind = "WEBP"
    if kind is None:
        ctype = content_type.split(";")[0].strip() or "no Content-Type"
        raise FetchError("not an image", f"{ctype}, {len(body)} bytes starting {body[:16]!r}")
    try:
        with Image.open(io.BytesIO(body)) as im:  # (Pillow's bomb warning: see flagsim.images)
            im.verify()
        with Image.open(io.BytesIO(body)) as im:
            if im.width * im.height > max_pixels:
                raise FetchError("bad image", f"{im.width}x{im.height} exceeds {max_pixels} pixels")
            im.load()
            if im.format == "PNG":
                return body
            # the PNG keeps what decoding the original would give: EXIF orientation applied
            # (a PNG copy has no EXIF), modes PNG cannot hold (CMYK, YCbCr, ...) as RGB(A)
            try:
                fixed = ImageOps.exif_transpose(im)
            except Exception:  # noqa: BLE001 - damaged EXIF: keep the pixels as stored
                fixed = im
            if fixed.mode not in _PNG_MODES:
                fixed = fixed.convert("RGBA" if "A" in fixed.getbands() else "RGB")
            out = io.BytesIO()
            fixed.save(out, format="PNG")
            return out.getvalue()
    except FetchError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        EOFError,
    ) as exc:
        raise FetchError("bad image", f"{kind}: {_short(exc)}") from None


# --------------------------------------------------------------------------------------------
# The scrape
# --------------------------------------------------------------------------------------------
def plan_images(entries: list[FlagEntry], width: int, exact: bool = False) -> list[PlannedImage]:
    """Unique safe file stems (`unique_stems` of the display names) and the URLs to fetch."""
    stems = unique_stems(e.name for e in entries)
    out = []
    for entry, stem in zip(entries, stems, strict=True):
        try:
            usable = urlsplit(entry.image_url).scheme in ("http", "https")
        except ValueError:  # unparseable: a "bad url" error row
            usable = False
        url = thumbnail_url(entry.image_url, width, exact) if usable else None
        out.append(PlannedImage(entry, stem, url))
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _previous_rows(run: RunDir) -> dict[str, dict]:
    loc = run.images_table
    if not loc.exists():
        return {}
    try:
        rows = loc.read_parquet().to_pylist()
    except DataError as exc:
        log.warning("ignoring unreadable previous images table: %s", exc)
        return {}
    return {r["image_id"]: r for r in rows if r.get("image_id")}


def _row(item: PlannedImage, path: Location, data: bytes, info: ImageInfo | None = None) -> dict:
    info = info or probe_image(data)
    return {
        "image_id": item.image_id,
        "name": item.entry.name,
        "path": str(path),
        "source_url": item.fetch_url,
        "sha256": info.sha256,
        "width": info.width,
        "height": info.height,
        "format": info.format,
    }


def _still_valid(prev: dict | None, path: Location, fetch_url: str | None = None) -> bytes | None:
    """The file's bytes when `prev` (a previous table row) still describes the file on disk."""
    if prev is None or (fetch_url is not None and prev.get("source_url") != fetch_url):
        return None
    data = read_regular(path)  # a FIFO or an unreadable name is not a kept image
    return data if data is not None and _sha256(data) == prev.get("sha256") else None


def _error(item: PlannedImage, exc: FetchError, kept: bool = False) -> dict:
    detail = exc.detail + ("; kept the previously downloaded image" if kept else "")
    return {
        "image_id": item.image_id,
        "name": item.entry.name,
        "table": item.entry.table,
        "url": item.fetch_url or item.entry.image_url,
        "status": exc.status,
        "reason": exc.reason,
        "detail": detail,
        "attempts": exc.attempts,
    }


def csv_cell(value: object) -> object:
    """`value` safe to open in a spreadsheet: text starting with = + - @ tab or CR gets a `'`.

    OWASP's advice against CSV (formula) injection; page text such as a state's name ends up
    in these cells.
    """
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def errors_csv_text(errors: list[dict]) -> str:
    buf = io.StringIO()
    # CRLF rows (RFC 4180): then a cell holding a CR or LF is quoted, so the rows stay intact
    writer = csv.DictWriter(buf, fieldnames=list(ERRORS_CSV_COLUMNS), lineterminator="\r\n")
    writer.writeheader()
    for e in errors:
        writer.writerow(
            {k: ("" if e.get(k) is None else csv_cell(e[k])) for k in ERRORS_CSV_COLUMNS}
        )
    return buf.getvalue()


def read_errors_csv(path: str | Location) -> list[dict]:
    loc = path if isinstance(path, Location) else Location.parse(path)
    return list(csv.DictReader(io.StringIO(loc.read_text(), newline="")))


def fetch_page(fetcher: Fetcher, url: str) -> str:
    """The page's HTML; DataError with the reason when it cannot be fetched."""
    try:
        page = fetcher.get(url, _PAGE_MAX_BYTES, accept="text/html,application/xhtml+xml")
    except FetchError as exc:
        raise DataError(f"cannot fetch {url}: {exc}") from None
    return page.body.decode("utf-8", errors="replace")


def scrape(out: str | Location, opts: ScrapeOptions, html: str | None = None) -> ScrapeResult:
    """Download every listed flag into `out/images/`, write `out/images.parquet` and `errors.csv`.

    Resumes: an image whose file still has the sha256 and source_url recorded in the previous
    table is not fetched again. `html` (for tests/offline use) skips fetching the page.
    """
    run = RunDir.at(out if isinstance(out, Location) else Location.parse(out))
    fetcher = Fetcher(opts)
    try:
        if html is None:
            log.info("fetching %s", opts.url)
            html = fetch_page(fetcher, opts.url)
        all_entries = parse_flag_tables(html, opts.url)
        if not all_entries:
            raise DataError(
                f"no flag table found at {opts.url} (expected a wikitable with Flag and State "
                "columns)"
            )
        entries = select_entries(all_entries, opts.de_facto, opts.extra_flags)
        if not entries:
            raise DataError(f"no sovereign-state flags found at {opts.url}")
        skipped_extra = sorted({e.name for e in all_entries if e.flag_number > 1})
        if skipped_extra and not opts.extra_flags:
            log.info(
                "%d further flag(s) of states with several flags not downloaded (use "
                "--extra-flags): %s",
                len(skipped_extra),
                ", ".join(skipped_extra[:10]),
            )
        items = plan_images(entries, opts.width, opts.exact_width)
        if (
            not opts.exact_width
            and any(i.fetch_url and is_wikimedia_upload(i.fetch_url) for i in items)
            and nearest_step(opts.width) != opts.width
        ):
            log.info(
                "upload.wikimedia.org only serves standard thumbnail widths: requesting %d px "
                "for --width %d (--exact-width to override)",
                nearest_step(opts.width),
                opts.width,
            )
        result = _download_all(run, items, fetcher, opts)
        result.skipped_extra = [] if opts.extra_flags else skipped_extra
        return result
    finally:
        fetcher.close()


def _download_all(
    run: RunDir, items: list[PlannedImage], fetcher: Fetcher, opts: ScrapeOptions
) -> ScrapeResult:
    previous = _previous_rows(run)
    images_dir = run.images_dir
    rows: dict[str, dict] = {}
    errors: dict[str, dict] = {}
    counts = {"downloaded": 0, "unchanged": 0, "reused": 0}
    lock = threading.Lock()
    todo: list[PlannedImage] = []

    for item in items:
        path = images_dir / f"{item.image_id}.png"
        if item.fetch_url is None:
            errors[item.image_id] = _error(
                item, FetchError("bad url", f"unusable image URL {item.entry.image_url!r}")
            )
            continue
        data = _still_valid(previous.get(item.image_id), path, item.fetch_url)
        if data is not None:
            rows[item.image_id] = _row(item, path, data)
            counts["reused"] += 1
        else:
            todo.append(item)
    log.info(
        "%d flag(s) listed: %d already downloaded, %d to fetch",
        len(items),
        counts["reused"],
        len(todo),
    )

    def fetch_and_store(item: PlannedImage, path: Location) -> None:
        assert item.fetch_url is not None
        fetched = fetcher.get(item.fetch_url, opts.max_bytes)
        try:
            data = check_image(fetched.body, fetched.content_type, opts.max_pixels)
            existing = read_regular(path)
            unchanged = existing is not None and _sha256(existing) == _sha256(data)
            if not unchanged:
                try:
                    path.write_bytes(data)  # atomic: temp file + rename
                except OSError as exc:
                    raise FetchError("file error", f"cannot write {path}: {_short(exc)}") from None
        except FetchError as exc:
            exc.attempts = fetched.attempts
            exc.status = 200
            raise
        with lock:
            rows[item.image_id] = _row(item, path, data)
            counts["unchanged" if unchanged else "downloaded"] += 1

    def work(item: PlannedImage) -> None:
        path = images_dir / f"{item.image_id}.png"
        try:
            fetch_and_store(item, path)
        except Exception as exc:  # noqa: BLE001 - one flag's failure never ends the scrape
            if not isinstance(exc, FetchError):
                log.debug("unexpected error for %s", item.entry.name, exc_info=True)
                exc = FetchError("internal error", f"{type(exc).__name__}: {_short(exc)}")
            kept = _still_valid(previous.get(item.image_id), path) is not None
            with lock:
                errors[item.image_id] = _error(item, exc, kept)
            log.warning("%s: %s (%s)", item.entry.name, exc, item.fetch_url)

    # a previous row to keep for an image whose refresh fails or never runs: the file on disk
    # still matches it (hashed once, here, not at every checkpoint)
    keepable = {item.image_id: previous[item.image_id] for item in todo
                if _still_valid(previous.get(item.image_id), images_dir / f"{item.image_id}.png")}

    def table_rows() -> list[dict]:
        with lock:
            done = dict(rows)
        out = []
        for item in items:
            if item.image_id in done:
                out.append(done[item.image_id])
            elif item.image_id in keepable:  # refresh failed or was interrupted: keep
                path = images_dir / f"{item.image_id}.png"
                out.append({**keepable[item.image_id], "path": str(path), "name": item.entry.name})
        return out

    checkpoints = 0

    def checkpoint() -> None:  # a SIGKILL or OOM kill loses at most CHECKPOINT_S of downloads
        nonlocal checkpoints
        with lock:
            finished = len(rows) + len(errors)
        if finished > checkpoints and (now := table_rows()):
            try:
                write_images_table(table_from_rows(now), run)
            except (OSError, DataError) as exc:  # e.g. a full disk: the final write will say
                log.warning("could not checkpoint the images table: %s", exc)
            checkpoints = finished

    interrupted: BaseException | None = None
    try:
        _run_workers(work, todo, opts.concurrency, fetcher.stopped, checkpoint)
    except BaseException as exc:  # KeyboardInterrupt, Terminated: keep what finished, re-raise
        interrupted = exc
        fetcher.stop()  # retries and back-offs end now; a request in flight is abandoned
        log.info("interrupted: writing the %d image(s) downloaded so far", len(rows))

    with _interrupts_deferred():  # a second Ctrl-C must not stop the table half written
        ordered = table_rows()
        with lock:
            error_rows = [errors[i.image_id] for i in items if i.image_id in errors]
        gone = sorted(set(previous) - {i.image_id for i in items})
        if gone:
            log.info(
                "%d image(s) of the previous table are no longer selected (files kept): %s",
                len(gone),
                ", ".join(gone[:10]),
            )
        result = ScrapeResult(
            table=table_from_rows(ordered),
            errors=error_rows,
            listed=len(items),
            **counts,
        )
        if ordered:
            result.images_table = write_images_table(result.table, run)
        result.errors_csv = run.root / "errors.csv"
        result.errors_csv.write_text(errors_csv_text(error_rows))
    if interrupted is not None:
        raise interrupted
    if not ordered:
        raise DataError(
            f"none of the {len(items)} images could be downloaded; reasons in {result.errors_csv}"
        )
    return result


#: how often a long download writes the images table of what it has so far
CHECKPOINT_S = 30.0


def _run_workers(work: Callable[[PlannedImage], None], todo: list[PlannedImage], concurrency: int,
                 stopped: threading.Event, checkpoint: Callable[[], None]) -> None:
    """`work(item)` for every item on `concurrency` daemon threads; the calling thread calls
    `checkpoint()` every CHECKPOINT_S and takes interrupts (KeyboardInterrupt, Terminated).
    Daemon threads, unlike an executor's, do not hold the process at exit for a download that
    is still in flight after an interrupt."""
    queue = list(reversed(todo))
    take = threading.Lock()

    def worker() -> None:
        while not stopped.is_set():
            with take:
                if not queue:
                    return
                item = queue.pop()
            work(item)

    threads = [threading.Thread(target=worker, name=f"scrape-{i}", daemon=True)
               for i in range(min(concurrency, len(todo)))]
    for t in threads:
        t.start()
    last = time.monotonic()
    for t in threads:
        while t.is_alive():
            t.join(0.2)
            if time.monotonic() - last >= CHECKPOINT_S:
                checkpoint()
                last = time.monotonic()


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (then raise as they would have)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    olds = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # ignored (nohup) stays ignored
            olds[sig] = signal.signal(sig, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        for sig, old in olds.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        if got:
            raise Terminated() if got[0] == signal.SIGTERM else KeyboardInterrupt()


__all__ = [
    "DEFAULT_URL",
    "DEFAULT_USER_AGENT",
    "DEFAULT_WIDTH",
    "DE_FACTO",
    "ERRORS_CSV_COLUMNS",
    "SOVEREIGN",
    "WIKIMEDIA_THUMB_STEPS",
    "FetchError",
    "Fetcher",
    "FlagEntry",
    "HostPolicy",
    "MalformedTable",
    "PlannedImage",
    "ScrapeOptions",
    "ScrapeResult",
    "check_image",
    "clean_image_url",
    "clean_name",
    "csv_cell",
    "nearest_step",
    "parse_flag_tables",
    "parse_retry_after",
    "plan_images",
    "read_errors_csv",
    "retry_delay",
    "scrape",
    "select_entries",
    "thumbnail_url",
]
