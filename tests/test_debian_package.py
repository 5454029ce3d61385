"""The Debian package, built from this tree and proven on clean Debian 13 and Debian 12.

README's way: `dpkg-buildpackage -b -us -uc` in a copy of the tree builds
f2bzmq_VERSION_all.deb, which lintian must pass. mmdebstrap makes a minimal root file
system of each release from Debian's mirror (the two at once), and inside it
`apt-get install ./f2bzmq_VERSION_all.deb` pulls every dependency from Debian (no pip).
Then tests/debian_cluster.py, in namespaces of its own, checks the installed files
(`systemd-analyze verify` of the units with the release's systemd, manual pages, no
unit enabled) and runs a hub and two nodes with the release's fail2ban: a ban on
node1 must reach node2's sync jail, and its end too.

Needs root, the build dependencies of debian/control (`apt-get build-dep ./`), lintian,
mmdebstrap, unshare and Debian's mirror: skipped, with the reason, where one is missing.
`python3 -m pytest -s tests/test_debian_package.py` shows the timings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_docker import Command, Timings, find, mounts_under

REPO = Path(__file__).resolve().parent.parent
MIRROR = "http://deb.debian.org/debian"
RELEASES = {"trixie": "Debian 13", "bookworm": "Debian 12"}
# The build and the chroots use Debian's own tools and Python, whatever else is on PATH.
SYSTEM_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
# Root file systems without documentation or translations: less to unpack. The package's
# manual pages stay, to be checked.
SLIM = [
    "path-exclude=/usr/share/doc/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/man/*",
    "path-include=/usr/share/man/man1",
    "path-include=/usr/share/man/man1/f2bzmq-*",
]


def version() -> str:
    """pyproject.toml's version."""
    return re.search(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), re.M)[1]


def changelog_version() -> str:
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    return re.match(r"^f2bzmq \(([^)]+)\)", first)[1]


def test_the_package_version_is_the_projects():
    from f2bzmq import __version__

    assert changelog_version() == version() == __version__


def missing() -> str | None:
    if os.geteuid() != 0:
        return "mmdebstrap, chroot and namespaces need root"
    for program in ("dpkg-buildpackage", "lintian", "mmdebstrap", "unshare"):
        if find(program) is None:
            return f"{program} is not installed (Debian: dpkg-dev lintian mmdebstrap util-linux)"
    checked = subprocess.run(
        ["dpkg-checkbuilddeps", str(REPO / "debian" / "control")],
        capture_output=True,
        text=True,
        env=SYSTEM_ENV,
        check=False,
    )
    if checked.returncode != 0:
        return f"{checked.stderr.strip()} (apt-get build-dep ./)"
    return None


def copy_tree(destination: Path) -> None:
    """The files of the source tree (as git sees them, when it can), not its build leftovers."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=False,
    )
    if listed.returncode == 0:
        for name in filter(None, listed.stdout.decode().split("\0")):
            source = REPO / name
            if source.is_file():
                (destination / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, destination / name, follow_symlinks=False)
    else:
        shutil.copytree(
            REPO,
            destination,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".*_cache"),
        )


def bootstrap(release: str, deb: Path, root: Path) -> Command:
    """A minimal release (apt and systemd, whose systemd-analyze checks our units), then
    README's install of the .deb with apt's default of installing Recommends."""
    hook = (
        'chroot "$1" sh -c "cd /root && apt-get install -y -q'
        f' -o APT::Install-Recommends=true ./{deb.name}"'
    )
    return Command(
        [
            "mmdebstrap",
            "--variant=apt",
            "--include=systemd",
            *(f"--dpkgopt={option}" for option in SLIM),
            f"--customize-hook=copy-in {deb} /root",
            f"--customize-hook={hook}",
            release,
            str(root),
            MIRROR,
        ],
        dict(SYSTEM_ENV, TMPDIR=str(root.parent)),
    )


def cluster(root: Path, work: Path) -> Command:
    """tests/debian_cluster.py as the first process of new PID, mount and network
    namespaces: whatever it mounts or starts ends with it."""
    work.mkdir()
    return Command(
        ["unshare", "--mount", "--pid", "--net", "--fork", "--kill-child", "--"]
        + ["/usr/bin/python3", str(REPO / "tests" / "debian_cluster.py"), str(root), str(work)],
        SYSTEM_ENV,
    )


def remove(folder: Path) -> None:
    """Unmount what an interrupted mmdebstrap may have left, then remove the folder."""
    for point in mounts_under(folder):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    left = mounts_under(folder)
    assert not left, f"{folder} still has mounts: {left}"
    subprocess.run(["rm", "-rf", "--one-file-system", str(folder)], check=False)


@pytest.fixture
def scratch(tmp_path_factory):
    # Not pytest's tmp_path: root file systems are big, and pytest keeps its folders.
    folder = Path(tmp_path_factory.mktemp("debian", numbered=True))
    try:
        yield folder
    finally:
        remove(folder)


MISSING = missing()


@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
def test_the_deb_installs_with_apt_on_debian_13_and_12_and_a_ban_travels(scratch):
    timings = Timings()
    source = scratch / "src"
    source.mkdir()
    copy_tree(source)
    deb = scratch / f"f2bzmq_{version()}_all.deb"
    with timings.step("dpkg-buildpackage"):
        Command(["dpkg-buildpackage", "-b", "-us", "-uc"], SYSTEM_ENV, cwd=source).finish(600)
    assert deb.is_file(), sorted(path.name for path in scratch.iterdir())

    running: list[Command] = []
    try:
        with timings.step("mmdebstrap and apt-get install, both releases"):
            roots = {release: scratch / release for release in RELEASES}
            bootstraps = {release: bootstrap(release, deb, roots[release]) for release in RELEASES}
            running += bootstraps.values()
            lint = Command(
                ["lintian", "--fail-on", "error,warning,info", "--info", str(deb)], SYSTEM_ENV
            )
            running.append(lint)
            for release, command in bootstraps.items():
                done = command.finish(900)
                assert (roots[release] / "usr/bin/f2bzmq-publisher").is_file(), done.stderr[-3000:]
        lintian = lint.finish(300, check=False)
        assert lintian.returncode == 0, lintian.stdout + lintian.stderr

        with timings.step("hub and two nodes, both releases"):
            clusters = {
                release: cluster(roots[release], scratch / f"{release}-cluster")
                for release in RELEASES
            }
            running += clusters.values()
            results = {}
            for release, command in clusters.items():
                done = command.finish(300, check=False)
                assert done.returncode == 0, (
                    f"{RELEASES[release]} ({release}): {done.stdout}{done.stderr[:1500]}"
                    f"\n…\n{done.stderr[-6000:]}"
                )
                results[release] = json.loads(done.stdout.splitlines()[-1])
    finally:
        for command in running:
            command.stop()

    for release, result in results.items():
        installed = result["package"]["versions"]
        assert installed["f2bzmq"] == version(), (release, installed)
        print(f"\n{RELEASES[release]} ({release}): {json.dumps(result)}")
    print(f"debian package: {timings.report()}")
