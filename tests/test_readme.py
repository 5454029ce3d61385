"""README.md says what works: its configuration examples load, its install steps are the
ones tests/test_debian_package.py runs."""

import re
import textwrap
from pathlib import Path

import pytest

from f2bzmq.config import load_config

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
# Fenced ```ini blocks, also those indented in a list item.
INI_BLOCKS = [
    textwrap.dedent(block)
    for _, block in re.findall(r"^( *)```ini\n(.*?)^\1```$", README, re.M | re.S)
]


def version() -> str:
    return re.search(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), re.M)[1]


def test_the_readme_has_configuration_examples():
    # Configure's drop-in and .local, and the migration's hub: a regex that finds none
    # would pass the test below for nothing.
    assert len(INI_BLOCKS) >= 3


@pytest.mark.parametrize("block", INI_BLOCKS, ids=[f"ini{n}" for n in range(len(INI_BLOCKS))])
def test_every_configuration_example_loads(tmp_path, block):
    path = tmp_path / "fail2ban-cluster.conf"
    path.write_text(block)
    load_config(str(path))


def test_the_package_install_is_the_one_ci_and_the_package_test_run():
    for command in (
        "apt-get build-dep ./",
        "dpkg-buildpackage -b -us -uc",
        f"apt-get install ../f2bzmq_{version()}_all.deb",
    ):
        assert command in README, command
    assert "apt-get build-dep" in (REPO / ".ci" / "run").read_text()
    package_test = (REPO / "tests" / "test_debian_package.py").read_text()
    assert '["dpkg-buildpackage", "-b", "-us", "-uc"]' in package_test
    assert "apt-get install -y -q" in package_test


def test_the_virtual_environment_gets_units_that_name_its_commands():
    rewrite = re.search(r"sed 's\|(/usr/bin/f2bzmq-)\|(/opt/f2bzmq/bin/f2bzmq-)\|'", README)
    assert rewrite, "README's sed over the units"
    assert f"python3 -m venv {Path(rewrite[2]).parent.parent}" in README
    for unit in sorted((REPO / "systemd").glob("fail2ban-*.service")):
        role = unit.stem.removeprefix("fail2ban-")
        assert f"ExecStart={rewrite[1]}{role} " in unit.read_text(), unit.name
    assert "pip install ." not in README.replace("/opt/f2bzmq/bin/pip install .", "")
