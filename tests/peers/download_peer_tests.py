"""Downloads the upstream test files of the INSTALLED peers (transformers, peft) from the package index into
`.peers/<name>-<version>/` (git-ignored), for `make test-peers`. Nothing is vendored: each run takes the sdist of the
versions pip installed, so the suites follow the lock and the newest releases alike.

    python tests/peers/download_peer_tests.py [--cache .peers]
"""

import argparse
import importlib.metadata
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# the test files of each peer that lavit's peer tests import (paths inside the sdist, below `<name>-<version>/`)
PEER_TEST_FILES = {
    "transformers": ["tests/*.py", "tests/utils/test_configuration_utils.py"],
    "peft": ["tests/testing_common.py", "tests/testing_utils.py"],
}


def peer_folder(cache: Path, name: str) -> Path:
    """Where the test files of the installed `name` live: `.peers/<name>-<installed version>`."""
    return cache / f"{name}-{importlib.metadata.version(name)}"


def download(name: str, cache: Path) -> Path:
    """The sdist of the installed `name`, fetched with pip (kept under `cache/sdists`)."""
    version = importlib.metadata.version(name)
    sdists = cache / "sdists"
    found = [path for path in sdists.glob(f"{name}-{version}.tar.gz")] if sdists.is_dir() else []
    if found:
        return found[0]
    sdists.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    f"{name}=={version}", "--dest", str(sdists)], check=True)
    found = list(sdists.glob(f"{name}-{version}.tar.gz"))
    if not found:
        raise SystemExit(f"pip download {name}=={version}: no {name}-{version}.tar.gz in {sdists}; check the index")
    return found[0]


def extract(sdist: Path, name: str, target: Path) -> None:
    """Extracts the files of PEER_TEST_FILES[name] into `target` (atomically: a sibling folder, then a rename)."""
    prefix = sdist.name.removesuffix(".tar.gz") + "/"
    patterns = PEER_TEST_FILES[name]
    with tarfile.open(sdist) as archive, tempfile.TemporaryDirectory(dir=target.parent) as staging:
        members = [member for member in archive.getmembers() if member.isfile() and member.name.startswith(prefix)
                   and any(Path(member.name.removeprefix(prefix)).match(pattern) for pattern in patterns)]
        for member in members:
            member.name = member.name.removeprefix(prefix)
            archive.extract(member, staging, filter="data")
        # the upstream `tests/` is a package (relative imports); its empty `__init__.py` is not in every sdist
        (Path(staging) / "tests" / "__init__.py").touch()
        Path(staging).rename(target)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(__file__).resolve().parents[2] / ".peers")
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    for name in PEER_TEST_FILES:
        target = peer_folder(args.cache, name)
        if not target.is_dir():
            extract(download(name, args.cache), name, target)
        print(f"{name}: {target}")


if __name__ == "__main__":
    main()
