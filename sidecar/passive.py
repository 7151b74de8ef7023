"""Provider errors the wizard's own traffic hit, read from Hermes' errors.log or the journal.

Hermes keeps its home 0700 (it resets the mode at every start), so on a deployed host the
sidecar cannot read errors.log; the gateway logs the same warnings to stderr, so then the
watcher reads the unit's journal instead (the sidecar user is in group systemd-journal).

Hermes 0.19.0 logs every failed provider call once per attempt, e.g.

    2026-11-23 07:48:11,301 WARNING [api-4616533c3b295d8a] agent.conversation_loop: API call
    failed (attempt 1/3) error_type=AuthenticationError thread=asyncio_0:1405 provider=custom
    base_url=http://127.0.0.1:18801/v1 model=mock-a summary=HTTP 401: Unauthorized.

(one line). base_url and model name the backend; the summary starts "HTTP <status>:" when there
was a response. Other lines about the same failure ("Retrying API call in", "Non-retryable client
error", "API call failed after N retries") repeat it and are not counted.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

from sidecar.probes import ProbeResult

log = logging.getLogger(__name__)

_FAILED = re.compile(r"API call failed \(attempt \d+/\d+\) error_type=(?P<etype>\S+) (?P<ctx>.*?) summary=(?P<summary>.*)$")
_KV = re.compile(r"(\w+)=(\S+)")
_STATUS = re.compile(r"\bHTTP (\d{3})\b")
# Bound one poll's read: after a long outage the log can be large, and only recent news matters.
_MAX_READ = 4 * 1024 * 1024


def _norm(url: str) -> str:
    return url.rstrip("/")


class PassiveWatcher:
    def __init__(self, wizard) -> None:
        self.wizard = wizard
        self.path = Path(wizard.home) / "logs" / "errors.log"
        self._inode: int | None = None
        self._offset = 0
        self._partial = b""
        self._journal = False
        self._cursor: str | None = None
        # Only errors logged from now on are news; history was before we were watching.
        try:
            st = self.path.stat()
            self._inode, self._offset = st.st_ino, st.st_size
        except OSError:
            pass

    def _read_new(self) -> bytes:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return b""
        chunks = []
        if self._inode is not None and st.st_ino != self._inode:
            # Rotated (RotatingFileHandler renames to errors.log.1): finish the old file first.
            rotated = self.path.with_name(self.path.name + ".1")
            try:
                if rotated.stat().st_ino == self._inode:
                    chunks.append(self._read_from(rotated, self._offset))
            except OSError:
                pass
            self._partial = b""
            self._offset = 0
        elif st.st_size < self._offset:
            # Truncated in place (copytruncate, or an operator's `: > errors.log`).
            self._partial = b""
            self._offset = 0
        self._inode = st.st_ino
        data = self._read_from(self.path, self._offset)
        self._offset += len(data)
        chunks.append(data)
        return b"".join(chunks)

    @staticmethod
    def _read_from(path: Path, offset: int) -> bytes:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size - offset > _MAX_READ:
                offset = size - _MAX_READ
            f.seek(offset)
            return f.read(max(0, size - offset))

    def _backend_for(self, base_url: str | None, model: str | None) -> str:
        if base_url is None:
            candidates = [b for b in self.wizard.backends if b.model == model]
        else:
            # A line naming another endpoint is not about our backend even if the model name
            # matches: Hermes' auxiliary clients call the provider's default URL (seen:
            # https://api.anthropic.com while the wizard's anthropic backend was a proxy).
            candidates = [b for b in self.wizard.backends if _norm(b.base_url) == _norm(base_url)]
            if len(candidates) > 1 and model is not None:
                candidates = [b for b in candidates if b.model == model] or candidates
        return candidates[0].name if len(candidates) == 1 else ""

    def _read_journal(self) -> bytes:
        """New lines of the gateway unit's journal since the last call."""
        args = ["journalctl", "-u", self.wizard.unit, "-o", "cat", "--no-pager", "--show-cursor"]
        args += [f"--after-cursor={self._cursor}"] if self._cursor else ["-n", "0"]
        out = subprocess.run(args, capture_output=True, timeout=10).stdout
        body, _, tail = out.rpartition(b"-- cursor: ")
        if tail.strip():
            self._cursor = tail.strip().decode()
            return body
        return out

    def poll(self) -> list[ProbeResult]:
        """New provider failures; `backend` is "" when the line names no backend of this wizard."""
        try:
            if self._journal:
                data = self._partial + self._read_journal()
            else:
                data = self._partial + self._read_new()
        except PermissionError:
            if not self._journal and getattr(self.wizard, "unit", None):
                log.info("%s is not readable; reading %s's journal instead", self.path,
                         self.wizard.unit)
                self._journal, self._partial = True, b""
                self._read_journal()  # only what comes from now on is news
            return []
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("cannot read %s: %s", self.path, exc)
            return []
        # A line still being written stays for the next poll.
        complete, sep, self._partial = data.rpartition(b"\n")
        if not sep:
            self._partial = data
            return []
        results = []
        for raw in complete.split(b"\n"):
            m = _FAILED.search(raw.decode("utf-8", errors="replace"))
            if not m:
                continue
            ctx = dict(_KV.findall(m.group("ctx")))
            summary = m.group("summary").strip()
            status = _STATUS.search(summary)
            results.append(ProbeResult(
                backend=self._backend_for(ctx.get("base_url"), ctx.get("model")),
                ok=False, reason="passive",
                status=int(status.group(1)) if status else None,
                retry_after=None, latency=0.0,
                detail=f"{m.group('etype')}: {summary}"[:200],
            ))
        return results
