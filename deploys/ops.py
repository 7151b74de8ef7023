"""pyinfra operations that the stock ones do not cover safely.

Each one reports a change only when it really changed something, so that a second deploy shows
zero changes.
"""

from __future__ import annotations

import hashlib
import shlex

from pyinfra import host
from pyinfra.api import operation
from pyinfra.facts.files import Directory, File, Link, Sha256File
from pyinfra.facts.server import Command

from neverdark import contract

q = shlex.quote


@operation()
def pip_requirements(venv: str, requirements: list[str], find_links: str | None = None,
                     no_index: bool = False):
    """Install exact requirements into a venv, once per distinct requirement set.

    pyinfra's pip.packages drops extras ("hermes-agent[messaging]" installs without aiohttp) and
    pip.packages(requirements=...) reinstalls on every run; a stamp written only after a
    successful install gives both extras and idempotency, and a failed install is retried.
    """
    body = "\n".join(requirements) + "\n"
    digest = hashlib.sha256(body.encode()).hexdigest()
    stamp = f"{venv}/.neverdark-requirements.sha256"
    current = host.get_fact(Command, f"cat {q(stamp)} 2>/dev/null || true")
    if (current or "").strip() == digest:
        host.noop(f"{venv} already has this requirement set")
        return
    args = ["--no-input", "--disable-pip-version-check"]
    if find_links:
        args += ["--find-links", find_links]
        if find_links.startswith("http://"):
            # pip ignores plain-http find-links on any host but localhost unless trusted
            args += ["--trusted-host", find_links.split("/")[2].split(":")[0]]
    if no_index:
        args.append("--no-index")
    reqs = " ".join(q(r) for r in requirements)
    yield (f"{q(venv)}/bin/pip install {' '.join(q(a) for a in args)} {reqs}"
           f" && echo {digest} > {q(stamp)}")


@operation()
def verified_file(path: str, sha256: str, url: str | None = None, staged: str | None = None,
                  rehash: bool = False, mode: str = "0644"):
    """Put a root-owned file at a hash-named path only once its sha256 matches.

    Either downloads `url` on the host or takes an already uploaded `staged` file (moved, not
    copied: on an SD card a model is then written once, not twice). The bytes go to a temporary
    name first and are renamed only after the check, so a failed or corrupt download never
    replaces a good file (pyinfra's files.download moves first and checks after). So a file
    already at `path` was verified: a stat tells, unless `rehash` asks for the full hash, and
    it is never written again (`file_mode` sets its owner and mode where an older deploy left
    others).
    """
    if (host.get_fact(Sha256File, path=path) == sha256 if rehash
            else host.get_fact(File, path=path)):
        host.noop(f"{path} present and verified")
        return
    tmp = f"{path}.partial"
    if url:
        fetch = ("python3 -c 'import shutil,sys,urllib.request;"
                 "r=urllib.request.urlopen(sys.argv[1], timeout=60);"
                 "shutil.copyfileobj(r, open(sys.argv[2], \"wb\"), 1<<20)' "
                 f"{q(url)} {q(tmp)}")
    elif staged:
        fetch = f"mv -f {q(staged)} {q(tmp)}"
    else:
        raise ValueError("verified_file needs url or staged")
    check = (f"got=$(sha256sum {q(tmp)} | cut -d' ' -f1); if [ \"$got\" != {q(sha256)} ]; then "
             f"rm -f {q(tmp)}; echo \"sha256 mismatch for {path}: got $got\" >&2; exit 1; fi")
    yield (f"rm -f {q(tmp)} && {fetch} && {check} && chown root:root {q(tmp)} && "
           f"chmod {mode} {q(tmp)} && mv -f {q(tmp)} {q(path)}")


@operation()
def file_mode(path: str, mode: str, user: str = "root", group: str = "root"):
    """Owner and mode of an existing file, set where they differ; never its contents, and
    nothing when the file is absent (whoever makes it sets them)."""
    found = host.get_fact(File, path=path)
    if not found or (found.get("user"), found.get("group"), found.get("mode")) == (
            user, group, int(mode[-3:])):
        host.noop(f"{path}: {user}:{group} {mode}" if found else f"{path} absent")
        return
    yield f"chown {q(user)}:{q(group)} {q(path)} && chmod {mode} {q(path)}"


@operation()
def atomic_symlink(path: str, target: str):
    """Point `path` at `target` with a rename, so readers never see it missing."""
    link = host.get_fact(Link, path=path)
    if link and link.get("link_target") == target:
        host.noop(f"{path} -> {target}")
        return
    tmp = f"{path}.new"
    yield f"ln -sfn {q(target)} {q(tmp)} && mv -Tf {q(tmp)} {q(path)}"


@operation()
def write_if_missing(path: str, source: str, user: str, group: str, mode: str):
    """Seed a file another party owns afterwards (the sidecar's active config)."""
    if host.get_fact(File, path=path):
        host.noop(f"{path} exists; left to its owner")
        return
    tmp = f"{path}.seed"
    yield (f"cp {q(source)} {q(tmp)} && chown {q(user)}:{q(group)} {q(tmp)} && "
           f"chmod {mode} {q(tmp)} && mv -f {q(tmp)} {q(path)}")


def token_command(path: str, user: str) -> str:
    """Shell that writes 32 random bytes, hex, to `path` (0600, `user`'s) and prints nothing."""
    tmp = f"{path}.new"
    # synced before the rename: a new file's data is not on disk with its name, and a power cut
    # would leave an empty token (which token_if_missing then replaces)
    return (f"umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > {q(tmp)} && "
            f"chown {q(user)}:{q(user)} {q(tmp)} && chmod 0600 {q(tmp)} && sync {q(tmp)} && "
            f"mv -f {q(tmp)} {q(path)}")



@operation()
def token_if_missing(path: str, user: str):
    """A random token made on the host, 0600 and `user`'s, when there is none: it never passes
    through the operator's machine, argv or pyinfra's output (the command prints nothing)."""
    found = host.get_fact(File, path=path)
    # shorter than the sidecar accepts: torn (a power cut before the data reached the disk)
    if found and (found.get("size") or 0) >= contract.METRICS_TOKEN_MIN:
        host.noop(f"{path} exists")
        return
    yield token_command(path, user)


@operation()
def archive_directory(path: str, archive_root: str, prefix: str):
    """Move a removed wizard's data aside rather than deleting it."""
    if not host.get_fact(Directory, path=path):
        host.noop(f"{path} already gone")
        return
    yield (f"mkdir -p {q(archive_root)} && chmod 0700 {q(archive_root)} && "
           f"mv {q(path)} {q(archive_root)}/{q(prefix)}-$(date -u +%Y%m%dT%H%M%SZ)")


def host_has_file(path: str) -> bool:
    """For `_if=` callbacks: is the file there now (read when the operation runs)."""
    return bool(host.get_fact(File, path=path))


def listed_names(directory: str) -> list[str]:
    """Names of entries in a remote directory (empty if it does not exist)."""
    out = host.get_fact(Command, f"ls -1 {q(directory)} 2>/dev/null || true") or ""
    return sorted(line.strip() for line in out.splitlines() if line.strip())


@operation()
def copy_on_change(source: str, dest: str, user: str, mode: str, changed=None):
    """Copy a deploy-owned file over one the service also writes, only when ours changed.

    Hermes rewrites HERMES_HOME/config.yaml at runtime; converging it on every deploy would
    fight the gateway and never reach zero changes.
    """
    if host.get_fact(File, path=dest) and not (changed and changed()):
        host.noop(f"{dest} kept (our copy unchanged)")
        return
    tmp = f"{dest}.neverdark"
    yield (f"cp {q(source)} {q(tmp)} && chown {q(user)}:{q(user)} {q(tmp)} && chmod {mode} {q(tmp)}"
           f" && mv -f {q(tmp)} {q(dest)}")


@operation()
def install_if_valid(source: str, dest: str, check: str, mode: str):
    """Install `source` as `dest` only if `check SOURCE` accepts it.

    For files whose breakage locks the operator out (a bad sudoers.d file breaks sudo for the
    Pi user the deploy connects as).
    """
    if host.get_fact(Sha256File, path=dest) == host.get_fact(Sha256File, path=source):
        host.noop(f"{dest} up to date")
        return
    tmp = f"{dest}.neverdark"
    yield (f"{check} {q(source)} && cp {q(source)} {q(tmp)} && chmod {mode} {q(tmp)} && "
           f"mv -f {q(tmp)} {q(dest)}")
