"""Check that the running environment holds exactly the locked packages: no more, no fewer, no other version.

Run by `make setup` right after installing, so a lock that pip silently overrode (a constraint, a cached build)
or a package that slipped in unlocked stops the set-up instead of surfacing later as a moved dependency.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

# Installed by `python -m venv` itself, not by the lock; pretrace is the editable project.
NOT_LOCKED = {"pip", "pretrace"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str) -> dict[str, str]:
    pins = {}
    for line in open(path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            sys.exit(f"{path}: '{line}' is not an exact pin (name==version)")
        pins[canonical(name)] = version.strip()
    return pins


def main(paths: list[str]) -> int:
    locked: dict[str, str] = {}
    for path in paths:
        locked.update(read_lock(path))
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    problems = [f"{name}=={version} is installed but not locked" for name, version in sorted(installed.items())
                if name not in locked and name not in NOT_LOCKED]
    problems += [f"{name}: locked {version}, installed {installed.get(name, 'nothing')}"
                 for name, version in sorted(locked.items()) if installed.get(name) != version]
    if problems:
        print("the environment differs from the lock (" + ", ".join(paths) + "):", *problems, sep="\n  ", file=sys.stderr)
        print("re-create it with `make clean-venv setup`, or regenerate the lock with `make lock`", file=sys.stderr)
        return 1
    print(f"environment matches the lock: {len(locked)} packages at their locked versions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
