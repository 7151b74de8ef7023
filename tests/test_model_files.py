"""Model files are written once and read-only (a Pi's SD card wears with every rewrite): the
deploy's own operations (deploys/ops.py, as deploys/models uses them) run by pyinfra against
this machine (@local), on files in a temporary directory only."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from neverdark import contract

REPO = Path(__file__).resolve().parent.parent
PYINFRA = Path(sys.executable).with_name("pyinfra")

DEPLOY = """
import os
from deploys import ops
final, staged = os.environ["ND_FINAL"], os.environ["ND_STAGED"]
ops.verified_file(name="verify", path=final, sha256=os.environ["ND_SHA"], staged=staged,
                  mode=os.environ["ND_MODE"])
ops.file_mode(name="read-only", path=final, mode=os.environ["ND_MODE"])
"""


def deploy(tmp_path: Path, final: Path, staged: Path, sha: str) -> subprocess.CompletedProcess:
    script = tmp_path / "model_deploy.py"
    script.write_text(DEPLOY)
    env = {**os.environ, "PYTHONPATH": str(REPO), "ND_FINAL": str(final),
           "ND_STAGED": str(staged), "ND_SHA": sha, "ND_MODE": contract.MODEL_FILE_MODE}
    return subprocess.run([str(PYINFRA), "-y", "@local", str(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def stamp(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def test_a_model_is_moved_in_once_read_only_and_never_rewritten(tmp_path):
    body = os.urandom(1 << 20)
    sha = hashlib.sha256(body).hexdigest()
    final, staged = tmp_path / f"{sha}.gguf", tmp_path / f"{sha}.gguf.upload"
    staged.write_bytes(body)
    staged_inode = staged.stat().st_ino

    first = deploy(tmp_path, final, staged, sha)
    assert first.returncode == 0, first.stdout + first.stderr
    st = final.stat()
    assert (oct(st.st_mode & 0o777), st.st_uid, st.st_gid) == ("0o444", 0, 0)
    assert final.read_bytes() == body
    # Moved, not copied: the uploaded bytes are the file (one write on an SD card, not two).
    assert st.st_ino == staged_inode and not staged.exists()
    assert not (tmp_path / f"{sha}.gguf.partial").exists()

    before = stamp(final)
    again = deploy(tmp_path, final, staged, sha)
    assert again.returncode == 0, again.stdout + again.stderr
    assert stamp(final) == before and final.stat().st_ctime_ns == st.st_ctime_ns

    # A file an older deploy left 0644: its mode is set, its bytes are not written again.
    os.chmod(final, 0o644)
    fixed = deploy(tmp_path, final, staged, sha)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert oct(final.stat().st_mode & 0o777) == "0o444" and stamp(final) == before


def test_a_corrupt_upload_never_becomes_the_model(tmp_path):
    sha = hashlib.sha256(b"the real model").hexdigest()
    final, staged = tmp_path / f"{sha}.gguf", tmp_path / f"{sha}.gguf.upload"
    staged.write_bytes(b"something else")
    result = deploy(tmp_path, final, staged, sha)
    assert result.returncode != 0
    assert "sha256 mismatch" in result.stdout + result.stderr
    assert not final.exists() and not (tmp_path / f"{sha}.gguf.partial").exists()
