"""bantime.increment across the cluster: the ban times of an address's later bans, as a
table, and the same table computed by fail2ban's own Jail.setBanTimeExtra and Observer
rules, so the hub's arithmetic is fail2ban's."""

import json

import pytest

from f2bzmq.config import seconds
from f2bzmq.escalation import (
    DEFAULT_FORMULA,
    Increment,
    check_formula,
    parse_factor,
    parse_multipliers,
    shared_random,
)
from tests.test_config import ask_fail2ban

DAY = 86400

# (settings as fail2ban's jail keys, base bantime, earlier bans, rnd) -> seconds
CASES = [
    ({}, 600, 0, 0.0, 600),
    ({}, 600, 1, 0.0, 1200),
    ({}, 600, 2, 0.0, 2400),
    ({}, 600, 5, 0.0, 19200),
    ({}, 600, 20, 0.0, 600 * 2**20),
    ({}, 60, 25, 0.0, 60 * 2**20),  # the formula stops doubling at 20
    ({"factor": "2"}, 600, 1, 0.0, 2400),
    ({"factor": "0.5"}, 600, 1, 0.0, 600),  # max(bantime, …): never shorter than the first
    ({"factor": "1.5"}, 100, 3, 0.0, 1200),
    ({"maxtime": "1h"}, 600, 3, 0.0, 3600),
    ({"maxtime": "1h"}, 600, 0, 0.0, 600),
    ({"multipliers": "1 5 30 60"}, 60, 0, 0.0, 60),
    ({"multipliers": "1 5 30 60"}, 60, 1, 0.0, 300),
    ({"multipliers": "1 5 30 60"}, 60, 3, 0.0, 3600),
    ({"multipliers": "1 5 30 60"}, 60, 9, 0.0, 3600),  # the last one repeats
    ({"multipliers": "1 2 4", "factor": "3"}, 10, 2, 0.0, 120),
    ({"multipliers": "1 2 4", "maxtime": "25"}, 10, 2, 0.0, 25),
    ({"rndtime": "100"}, 600, 1, 0.25, 1225),
    ({"rndtime": "100", "maxtime": "1000"}, 600, 1, 0.5, 1050),  # random after the limit
    ({}, -1, 3, 0.0, -1),  # a permanent ban stays permanent
    ({}, DAY, 1, 0.0, 2 * DAY),
]


def increment(settings: dict) -> Increment:
    return Increment(
        enabled=True,
        factor=parse_factor(settings.get("factor", "1")),
        multipliers=parse_multipliers(settings.get("multipliers", "")),
        maxtime=int(seconds(settings["maxtime"])) if "maxtime" in settings else None,
        rndtime=int(seconds(settings["rndtime"])) if "rndtime" in settings else None,
    )


@pytest.mark.parametrize("settings, base, earlier, rnd, expected", CASES)
def test_ban_times(settings, base, earlier, rnd, expected):
    assert increment(settings).bantime(base, earlier, rnd) == expected


def test_without_increment_every_ban_is_the_base():
    assert Increment(enabled=False).bantime(600, 7) == 600


# fail2ban's own code: the evformula its Jail builds from the jail's bantime.* keys, applied
# as Observer.incrBanTime applies it (only to a ban with earlier ones, never a permanent
# one); random.random() replaced by each case's rnd.
FAIL2BAN = """
import json, random, sys
from fail2ban.server.jail import Jail
from fail2ban.server.observer import ObserverThread
class Stub:  # just what Jail.setBanTimeExtra uses
    _banExtra = {}
    database = None
results = []
for settings, base, earlier, rnd, _ in json.loads(sys.argv[1]):
    jail = Stub()
    jail._banExtra = {}
    for key in ("increment", "factor", "multipliers", "maxtime", "rndtime"):
        value = "true" if key == "increment" else settings.get(key)
        if value is not None:
            Jail.setBanTimeExtra(jail, key, value)
    if "evformula" not in jail._banExtra:
        Jail.setBanTimeExtra(jail, "formula", None)
    random.random = lambda rnd=rnd: rnd
    banTime = base
    if banTime > 0 and earlier > 0:
        banTime = jail._banExtra["evformula"](ObserverThread.BanTimeIncr(base, earlier))
    results.append(int(banTime))
print(json.dumps(results))
"""


def test_fail2ban_computes_the_same_table():
    assert ask_fail2ban(FAIL2BAN, json.dumps(CASES)) == [case[-1] for case in CASES]


@pytest.mark.parametrize(
    "formula",
    [
        "ban.Time * math.exp(float(ban.Count+1)*banFactor)/math.exp(1*banFactor)",
        "__import__('os').system('id')",
        "ban.Time * 3",
    ],
)
def test_no_formula_but_the_default_is_taken(formula):
    with pytest.raises(ValueError, match="only fail2ban's default formula"):
        check_formula(formula)


def test_the_default_formula_is_taken_however_it_is_spaced():
    assert check_formula(DEFAULT_FORMULA.replace(" ", "")) == DEFAULT_FORMULA
    assert check_formula("ban.Time*(1<<(ban.Count if ban.Count<20 else 20))  *  banFactor")


@pytest.mark.parametrize(
    "parse, text, error",
    [
        (parse_factor, "2.0 / 2.885385", "is not a number"),
        (parse_factor, "0", "out of range"),
        (parse_multipliers, "1 2 x", "'x' is not a whole number"),
        (parse_multipliers, "1 0 2", "'0' is not a whole number"),
    ],
)
def test_what_is_refused(parse, text, error):
    with pytest.raises(ValueError, match=error):
        parse(text)


def test_the_random_share_is_the_same_for_the_same_decision_and_keyed():
    assert shared_random("a" * 32, b"key") == shared_random("a" * 32, b"key")
    assert shared_random("a" * 32, b"key") != shared_random("b" * 32, b"key")
    assert shared_random("a" * 32, b"key") != shared_random("a" * 32, b"other")
    shares = [shared_random(f"{n:032x}") for n in range(1000)]
    assert all(0 <= share < 1 for share in shares)
    assert 0.4 < sum(shares) / len(shares) < 0.6
