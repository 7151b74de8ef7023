"""What every neverdark host needs before any component: Python venvs and sudo."""

from pyinfra.api import deploy
from pyinfra.operations import apt, files

PACKAGES = ["python3", "python3-venv", "sudo"]


@deploy("neverdark base")
def deploy_base():
    # apt.packages only reaches the network when something is missing: offline hosts with
    # these preinstalled converge without an index.
    apt.packages(name="base packages", packages=PACKAGES, update=False)
    for path in ("/opt/neverdark", "/etc/neverdark", "/var/lib/neverdark"):
        files.directory(name=f"{path}", path=path, user="root", group="root", mode="0755")
