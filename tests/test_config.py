"""Configuration: shipped file, .local overrides, one-line errors naming file, section, key."""

from pathlib import Path

import pytest

from f2bzmq.config import SCHEMA, ConfigError, load_config

SHIPPED = Path(__file__).resolve().parent.parent / "fail2ban-cluster.conf"


def write(tmp_path, text, name="fail2ban-cluster.conf"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_shipped_file_documents_every_key_with_its_default():
    text = SHIPPED.read_text()
    for (section, key), (default, _) in SCHEMA.items():
        assert f"[{section}]" in text
        assert f"\n{key} = {default}".rstrip() in text, (section, key)
    load_config(str(SHIPPED))


def test_defaults_and_endpoints(tmp_path):
    config = load_config(write(tmp_path, "[general]\nnode = web1\nhubs = 10.0.0.1, ::1\n"))
    assert config.node == "web1"
    assert config.endpoints("report_port") == ["tcp://10.0.0.1:5690", "tcp://[::1]:5690"]
    assert config.subscriber.batch_size == 2000
    assert config.sync_jails() == {"cluster"}


def test_local_file_overrides(tmp_path):
    path = write(tmp_path, "[general]\nnode = web1\n[subscriber]\nbatch_size = 50\n")
    write(tmp_path, "[subscriber]\nbatch_size = 10\n", "fail2ban-cluster.local")
    config = load_config(path)
    assert config.subscriber.batch_size == 10
    assert config.node == "web1"


def test_relative_paths_are_taken_from_the_files_folder(tmp_path):
    config = load_config(write(tmp_path, "[general]\nstate_dir = state\n"))
    assert config.general.state_dir == str(tmp_path.resolve() / "state")


def test_jail_map(tmp_path):
    config = load_config(
        write(tmp_path, "[general]\njail_map = sshd = sshd-cluster\n  nginx = web-cluster\n")
    )
    assert config.general.jail_map == {"sshd": "sshd-cluster", "nginx": "web-cluster"}
    assert config.sync_jails() == {"cluster", "sshd-cluster", "web-cluster"}


@pytest.mark.parametrize(
    "text, error",
    [
        ("[general]\nreport_port = 70000\n", "[general] report_port: 70000 is out of range"),
        ("[general]\nreport_port = five\n", "[general] report_port: 'five' is not a int"),
        ("[general]\nhubs = bad host!\n", "[general] hubs: 'host!' is not a host name"),
        ("[general]\nhubs = ho-st!\n", "[general] hubs: 'ho-st!' is not a host name"),
        ("[general]\nhubs =\n", "[general] hubs: names no host"),
        ("[general]\nnode = web 1\n", "[general] node: must be 1-64"),
        ("[general]\nsync_jail = ../x\n", "[general] sync_jail: must be 1-64"),
        ("[general]\njail_map = sshd\n", "[general] jail_map: 'sshd' is not"),
        ("[general]\nloglevel = LOUD\n", "[general] loglevel: 'LOUD' is not one of"),
        ("[general]\nlogtarget = relative.log\n", "[general] logtarget: must be AUTO"),
        ("[subscriber]\nallowlist = 10.0.0.0/33\n", "[subscriber] allowlist: '10.0.0.0/33'"),
        ("[publisher]\nallow_networks = maybe\n", "[publisher] allow_networks: 'maybe' is not"),
        ("[monitor]\nstart_at = middle\n", "[monitor] start_at: 'middle' is not one of"),
        ("[monitor]\nlogfile = /x\n", "[monitor] logfile: unknown key"),
        ("[hub]\nx = 1\n", "[hub]: unknown section"),
        ("node = x\n", "not a valid INI file"),
    ],
)
def test_mistakes_name_file_section_and_key(tmp_path, text, error):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert message.startswith(path + ": ")
    assert error in message
    assert "\n" not in message


def test_mistake_in_the_local_file_names_the_local_file(tmp_path):
    path = write(tmp_path, "[general]\n")
    local = write(tmp_path, "[subscriber]\nbatch_size = 0\n", "fail2ban-cluster.local")
    with pytest.raises(ConfigError, match=f"^{local}: \\[subscriber\\] batch_size: 0 is out"):
        load_config(path)


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read: No such file"):
        load_config(str(tmp_path / "missing.conf"))
