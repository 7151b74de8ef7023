"""A sidecar `hooks.command` for tests: each event it is handed on stdin becomes one JSON file
in the folder named by its argument, written under a temporary name and renamed, so a reader
never sees half an event."""

HOOK = r"""
import os, sys, uuid
data = sys.stdin.buffer.read()
out = sys.argv[1]
tmp = os.path.join(out, "." + uuid.uuid4().hex)
with open(tmp, "wb") as f:
    f.write(data)
os.replace(tmp, os.path.join(out, uuid.uuid4().hex + ".json"))
"""
