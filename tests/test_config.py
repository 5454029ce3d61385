"""Configuration: shipped file, drop-ins and .local overrides, fail2ban's comments and times,
one-line errors naming file, section, key. Where fail2ban is installed, its own reader
and time parser check that f2bzmq reads the same files the same way."""

import json
import os
import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

from f2bzmq.config import (
    SCHEMA,
    ConfigError,
    _read_ini,
    config_files,
    key_name,
    load_config,
    seconds,
)
from f2bzmq.keys import keygen
from f2bzmq.protocol import ProtocolError

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


def test_the_hub_keeps_its_files_in_folders_of_its_own(tmp_path):
    """It runs as a user of its own: none of its folders is one the node's roles use."""
    config = load_config(write(tmp_path, "[general]\nstate_dir = /srv/f2b\nrun_dir = /run/f2b\n"))
    assert config.publisher.state_dir == "/srv/f2b/publisher"
    assert config.control_path("publisher") == Path("/run/f2b/publisher/publisher.sock")
    assert config.control_path("monitor") == Path("/run/f2b/monitor.sock")
    assert config.state_path("monitor.sqlite3") == Path("/srv/f2b/monitor.sqlite3")
    config = load_config(write(tmp_path, "[publisher]\nstate_dir = hub\nrun_dir = /run/hub\n"))
    assert config.publisher.state_dir == str(tmp_path.resolve() / "hub")
    assert config.run_dir("publisher") == Path("/run/hub")
    long = f"/{'r' * 100}"
    with pytest.raises(ConfigError, match=r"\[publisher\] run_dir: too long for .*/publisher.sock"):
        load_config(write(tmp_path, f"[publisher]\nrun_dir = {long}\n"))


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


def fail2ban_python() -> str | None:
    """The interpreter fail2ban runs on (its client's #! line), to ask fail2ban itself."""
    client = shutil.which("fail2ban-client", path=os.environ.get("PATH", "") + ":/usr/bin")
    if client is None:
        return None
    first = Path(client).read_bytes().split(b"\n", 1)[0]
    return first[2:].decode().strip().split()[0] if first.startswith(b"#!") else None


def ask_fail2ban(code: str, *args: str) -> object:
    """Run code with fail2ban's modules importable; what it prints, as JSON."""
    python = fail2ban_python()
    if python is None:
        pytest.skip("needs fail2ban (apt-get install fail2ban)")
    done = subprocess.run(
        [python, "-c", code, *args], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(done.stdout)


TIMES = [
    ("600", 600),
    ("-1", -1),
    ("30s", 30),
    ("10m", 600),
    ("10 m", 600),
    ("1h", 3600),
    ("1d", 86400),
    ("1w", 604800),
    ("2ww", 1209600),
    ("1mo", 2629800),
    ("1y", 31557600),
    ("1h 30m", 5400),
    ("1h30m", 5400),
    ("1d12h", 129600),
    ("0d 1h 30m", 5400),
    ("1hour+30min", 5400),
    ("1year-6mo", 15778800),
    ("6 months", 15778800),
    ("2*1w", 1209600),
    ("1h/2", 1800),
    ("(1h + 1m) * 2", 7320),
    ("1.5h", 5400),
    ("3 Days", 259200),
    ("10 20", 30),
]


def test_times_read_as_fail2ban_reads_them():
    assert [seconds(text) for text, _ in TIMES] == [value for _, value in TIMES]
    code = (
        "import json, sys\n"
        "from fail2ban.server.mytime import MyTime\n"
        "print(json.dumps([MyTime.str2seconds(t) for t in json.loads(sys.argv[1])]))\n"
    )
    assert ask_fail2ban(code, json.dumps([text for text, _ in TIMES])) == [v for _, v in TIMES]


@pytest.mark.parametrize(
    "text, error",
    [
        ("", "'' is not a time"),
        ("10mins", "'mins' is not a time unit"),
        ("1e3", "'e' is not a time unit"),
        ("1h)", "is not a time"),
        ("(1h", "is not a time"),
        ("1h +", "is not a time"),
        ("h", "is not a time"),
        ("1h/0", "divides by zero"),
        ("__import__('os')", "is not a time"),
        ("10 m m", "is not a time"),
    ],
)
def test_what_is_not_a_time(text, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        seconds(text)


TIME_KEYS = [key for key in SCHEMA if re.search(r"(time|timeout|interval|window|age)$", key[1])]


def test_the_time_keys_are_the_ones_expected():
    assert TIME_KEYS == [
        ("monitor", "ack_timeout"),
        ("monitor", "failure_window"),
        ("publisher", "default_bantime"),
        ("publisher", "heartbeat_interval"),
        ("publisher", "rebuild_window"),
        ("publisher", "dbpurgeage"),
        ("subscriber", "heartbeat_timeout"),
        ("subscriber", "resync_interval"),
        ("detect", "findtime"),
        ("detect", "bantime"),
        ("detect", "bantime.maxtime"),
        ("detect", "bantime.rndtime"),
        ("relay", "heartbeat_timeout"),
    ]


def setting(settings: object, key: str) -> object:
    """A setting by the name the file gives its key ("bantime.maxtime")."""
    (found,) = [f for f in fields(settings) if key_name(f) == key]
    return getattr(settings, found.name)


@pytest.mark.parametrize("section, key", TIME_KEYS, ids=[key for _, key in TIME_KEYS])
@pytest.mark.parametrize("text", ["1m", "60s", "1 min", "30s 30s", "0.5m + 30"])
def test_every_time_key_takes_fail2bans_units(tmp_path, section, key, text):
    config = load_config(write(tmp_path, f"[{section}]\n{key} = {text}\n"))
    value = setting(config.section(section), key)
    assert value == 60
    shipped = setting(load_config(str(SHIPPED)).section(section), key)
    assert type(value) is type(shipped if shipped is not None else 60)


def test_a_permanent_default_bantime(tmp_path):
    config = load_config(write(tmp_path, "[publisher]\ndefault_bantime = -1\n"))
    assert config.publisher.default_bantime == -1


@pytest.mark.parametrize(
    "text, error",
    [
        (
            "[monitor]\nack_timeout = 2h\n",
            "[monitor] ack_timeout: 2h (7200 s) is out of range 0.1..3600 seconds",
        ),
        (
            "[monitor]\nack_timeout = 7200\n",
            "[monitor] ack_timeout: 7200 is out of range 0.1..3600",
        ),
        (
            "[publisher]\ndefault_bantime = 1.5s\n",
            "[publisher] default_bantime: '1.5s' is not a whole",
        ),
        (
            "[publisher]\ndefault_bantime = -2\n",
            "[publisher] default_bantime: -2 is out of range -1..",
        ),
        ("[subscriber]\nresync_interval = 5 minutes later\n", "[subscriber] resync_interval: "),
    ],
)
def test_time_mistakes_name_file_section_and_key(tmp_path, text, error):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"{path}: {error}")


COMMENTED = """\
# a comment line
; another
[general]
hubs = 10.0.0.5   ; the hub
node = web1;not-a-comment-without-a-blank-before-it
jail_map = sshd = sshd-cluster   ; ssh
           nginx = web-cluster
[publisher]
default_bantime = 1h  ; an hour
"""


def test_inline_comments_as_fail2ban_reads_them(tmp_path):
    path = write(tmp_path, COMMENTED.replace(";not-a-comment-without-a-blank-before-it", ""))
    config = load_config(path)
    assert config.general.hubs == ["10.0.0.5"]
    assert config.general.jail_map == {"sshd": "sshd-cluster", "nginx": "web-cluster"}
    assert config.publisher.default_bantime == 3600
    # fail2ban's own parser reads the very same values from the file.
    both = write(tmp_path, COMMENTED, "both.conf")
    code = (
        "import json, sys\n"
        "from fail2ban.client.configparserinc import SafeConfigParserWithIncludes\n"
        "parser = SafeConfigParserWithIncludes()\n"
        "parser.read(sys.argv[1])\n"
        "print(json.dumps({s: dict(parser.items(s, raw=True)) for s in parser.sections()}))\n"
    )
    theirs = ask_fail2ban(code, both)
    ours = {}
    for (section, key), value in _read_ini(both).items():
        ours.setdefault(section, {})[key] = value
    assert ours == theirs
    assert ours["general"]["node"] == "web1;not-a-comment-without-a-blank-before-it"


@pytest.mark.parametrize(
    "line, key",
    [
        ("[general]\nhubs = 10.0.0.5   # the hub\n", "[general] hubs"),
        ("[general]\nstate_dir = /var/lib/x # mine\n", "[general] state_dir"),
        ("[publisher]\nlegacy_token = abc #1\n", "[publisher] legacy_token"),
    ],
)
def test_a_hash_within_a_line_is_refused_with_the_way_to_comment(tmp_path, line, key):
    path = write(tmp_path, line)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value) == (
        f"{path}: {key}: '#' starts a comment only at the start of a line; put the comment "
        "on a line of its own or after ' ;', as in fail2ban"
    )


def drop_in_tree(folder: Path, base: str) -> None:
    """BASE.conf, BASE.local and BASE.d/ with drop-ins: each sets batch_size, so the last
    file read wins; the first drop-in also sets a key nobody overrides."""
    folder.mkdir()
    drop_ins = folder / f"{base}.d"
    drop_ins.mkdir()
    (folder / f"{base}.conf").write_text("[subscriber]\nbatch_size = 1\nresync_interval = 1\n")
    (drop_ins / "20-b.conf").write_text("[subscriber]\nbatch_size = 3\n")
    (drop_ins / "10-a.conf").write_text("[subscriber]\nbatch_size = 2\nheartbeat_timeout = 2\n")
    (folder / f"{base}.local").write_text("[subscriber]\nbatch_size = 4\n")
    (drop_ins / "10-a.local").write_text("[subscriber]\nbatch_size = 5\n")
    (drop_ins / "20-b.local").write_text("[subscriber]\nbatch_size = 6\n[general]\nnode = n6\n")
    (drop_ins / ".#30-c.local").write_text("[subscriber]\nbatch_size = 99\n")  # hidden
    (drop_ins / "40-d.conf.dpkg-old").write_text("[subscriber]\nbatch_size = 98\n")


def test_drop_ins_are_read_in_fail2bans_order(tmp_path):
    drop_in_tree(tmp_path / "ours", "fail2ban-cluster")
    path = str(tmp_path / "ours" / "fail2ban-cluster.conf")
    read = [os.path.relpath(file, tmp_path / "ours") for file in config_files(path)]
    assert read == [
        "fail2ban-cluster.conf",
        "fail2ban-cluster.d/10-a.conf",
        "fail2ban-cluster.d/20-b.conf",
        "fail2ban-cluster.local",
        "fail2ban-cluster.d/10-a.local",
        "fail2ban-cluster.d/20-b.local",
    ]
    config = load_config(path)
    assert config.subscriber.batch_size == 6
    assert config.subscriber.heartbeat_timeout == 2.0
    assert config.subscriber.resync_interval == 1.0
    assert config.node == "n6"
    # fail2ban's own reader picks the same files in the same order for its jail.conf.
    drop_in_tree(tmp_path / "theirs", "jail")
    code = (
        "import json, sys\n"
        "from fail2ban.client.configparserinc import SafeConfigParserWithIncludes\n"
        "from fail2ban.client.configreader import ConfigReaderUnshared\n"
        "read = []\n"
        "SafeConfigParserWithIncludes.read = lambda self, files, **_: read.extend(files) or files\n"
        "ConfigReaderUnshared(basedir=sys.argv[1]).read('jail')\n"
        "print(json.dumps(read))\n"
    )
    theirs = ask_fail2ban(code, str(tmp_path / "theirs"))
    theirs = [os.path.relpath(file, tmp_path / "theirs") for file in theirs]
    assert theirs == [file.replace("fail2ban-cluster", "jail") for file in read]


def test_a_mistake_in_a_drop_in_names_the_drop_in(tmp_path):
    path = write(tmp_path, "[general]\n")
    (tmp_path / "fail2ban-cluster.d").mkdir()
    drop_in = write(tmp_path / "fail2ban-cluster.d", "[monitor]\nack_timeout = soon\n", "x.local")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert (
        str(raised.value)
        == f"{drop_in}: [monitor] ack_timeout: 'soon' is not a time (e.g. 600, 10m, 1h, 1d, 1w)"
    )


# Cluster jails: [detect:NAME] sections, fail2ban's keys, [detect] their defaults.


def test_a_cluster_jail_takes_fail2bans_keys_and_the_detect_defaults(tmp_path):
    config = load_config(
        write(
            tmp_path,
            "[detect]\nfindtime = 1h\nbantime.increment = true\n"
            "[detect:sshd]\nenabled = true\nmaxretry = 8\n"
            "[detect:web]\nenabled = true\njails = nginx-http-auth, nginx-botsearch\n"
            "bantime = 1d\nbantime.multipliers = 1 2 4\nbantime.maxtime = 1w\n"
            "[detect:off]\nmaxretry = 3\n",
        )
    )
    sshd, web = config.cluster_jails["sshd"], config.cluster_jails["web"]
    assert sorted(config.cluster_jails) == ["sshd", "web"]  # [detect:off] is not enabled
    assert (sshd.jails, sshd.maxretry, sshd.findtime, sshd.bantime, sshd.min_nodes) == (
        ["sshd"],
        8,
        3600,
        600,
        2,
    )
    assert web.jails == ["nginx-http-auth", "nginx-botsearch"] and web.findtime == 3600
    increment = web.bantime_increment()
    assert (increment.enabled, increment.multipliers, increment.maxtime) == (
        True,
        (1, 2, 4),
        604800,
    )
    assert config.detect_jails() == {
        "sshd": "sshd",
        "nginx-http-auth": "web",
        "nginx-botsearch": "web",
    }
    assert load_config(str(SHIPPED)).cluster_jails == {}


def test_a_drop_in_can_turn_a_cluster_jail_on_and_the_local_file_off(tmp_path):
    path = write(tmp_path, "[detect:sshd]\nmaxretry = 6\n")
    (tmp_path / "fail2ban-cluster.d").mkdir()
    write(tmp_path, "[detect:sshd]\nenabled = true\n", "fail2ban-cluster.d/detect.conf")
    assert load_config(path).cluster_jails["sshd"].maxretry == 6
    write(tmp_path, "[detect:sshd]\nenabled = false\n", "fail2ban-cluster.local")
    assert load_config(path).cluster_jails == {}


@pytest.mark.parametrize(
    "text, error",
    [
        ("[detect:sshd]\nmaxretry = 0\n", "[detect:sshd] maxretry: 0 is out of range"),
        ("[detect:sshd]\nbantime = 0\n", "[detect:sshd] bantime: must be at least 1 second"),
        ("[detect:sshd]\nfindtime = soon\n", "[detect:sshd] findtime: 'soon' is not a time"),
        ("[detect:sshd]\nmaxtries = 3\n", "[detect:sshd] maxtries: unknown key"),
        ("[detect:ss hd]\nenabled = true\n", "[detect:ss hd]: the cluster jail's name must be"),
        (
            "[detect]\nbantime.factor = 2.0 / 2.885385\n",
            "[detect] bantime.factor: '2.0 / 2.885385'",
        ),
        (
            "[detect:sshd]\nbantime.formula = ban.Time * math.exp(float(ban.Count+1))\n",
            "[detect:sshd] bantime.formula: only fail2ban's default formula is taken",
        ),
        ("[detect:sshd]\nbantime.multipliers = 1 2 x\n", "[detect:sshd] bantime.multipliers: 'x'"),
        (
            "[detect:sshd]\nenabled = true\n[detect:ssh2]\nenabled = true\njails = sshd\n",
            "[detect:sshd] jails: sshd is counted by [detect:ssh2] already",
        ),
        (
            "[detect:cluster]\nenabled = true\n",
            "[detect:cluster] jails: cluster is a sync jail: its bans come from the cluster",
        ),
        ("[general]\nnode = cluster\n", "[general] node: 'cluster' names the bans the hubs decide"),
    ],
)
def test_cluster_jail_mistakes_name_file_section_and_key(tmp_path, text, error):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"{path}: {error}")


def test_no_node_key_can_have_the_reserved_name(tmp_path):
    with pytest.raises(ProtocolError, match="'cluster' names the bans the hubs decide"):
        keygen("cluster", tmp_path / "keys")
    assert not (tmp_path / "keys").exists()
