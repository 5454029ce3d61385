"""fail2ban's `bantime.increment`, for the bans the cluster counts: how long the next ban
of an address lasts, after how many earlier ones.

The arithmetic is fail2ban 1.0's (`Observer.incrBanTime` with the formula `Jail.setBanTimeExtra`
builds): the first ban lasts `bantime`; the ban after `count` earlier ones lasts
`bantime * factor * multipliers[count]` (the last multiplier once `count` passes them) or,
without multipliers, `max(bantime, bantime * 2**min(count, 20) * factor)`; then at most
`maxtime`, then plus up to `rndtime`. fail2ban evaluates `bantime.formula` and
`bantime.factor` as Python; the hub evaluates nothing a file says: it takes the default
formula only (any other progression is written as `bantime.multipliers`) and a factor that
is a number.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# fail2ban's default, as jail.conf documents it; the only formula taken.
DEFAULT_FORMULA = "ban.Time * (1<<(ban.Count if ban.Count<20 else 20)) * banFactor"
MAX_DOUBLINGS = 20  # fail2ban's formula stops doubling after 20 earlier bans
MAX_BANTIME = 2**31 - 1  # seconds: what an event's bantime can say


def check_formula(text: str) -> str:
    """The default formula (blanks aside) or ValueError: nothing here evaluates an expression."""
    if "".join(text.split()) != "".join(DEFAULT_FORMULA.split()):
        raise ValueError(
            "only fail2ban's default formula is taken (the hub evaluates no expression); "
            "write another progression as bantime.multipliers, e.g. 1 5 30 60 300 720 1440"
        )
    return DEFAULT_FORMULA


def parse_factor(text: str) -> float:
    """bantime.factor as a number (fail2ban evaluates it; the hub takes a number only)."""
    try:
        factor = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number (the hub evaluates no expression)") from None
    if not 0 < factor <= 1000:
        raise ValueError(f"{text} is out of range 0..1000")
    return factor


def parse_multipliers(text: str) -> tuple[int, ...]:
    """bantime.multipliers: whole numbers separated by blanks, as fail2ban splits them."""
    multipliers = []
    for word in text.split():
        if not word.isdigit() or not 1 <= int(word) <= 10**6:
            raise ValueError(f"{word!r} is not a whole number 1..1000000")
        multipliers.append(int(word))
    return tuple(multipliers)


@dataclass(frozen=True)
class Increment:
    """A cluster jail's bantime.* settings."""

    enabled: bool = False  # bantime.increment
    factor: float = 1.0
    multipliers: tuple[int, ...] = ()
    maxtime: int | None = None  # seconds; None: no limit
    rndtime: int | None = None  # seconds; None: nothing random
    overalljails: bool = False  # count earlier bans of the address in every cluster jail

    def bantime(self, base: int, count: int, rnd: float = 0.0) -> int:
        """The ban time (seconds, -1 permanent) of a ban of base `base` after `count`
        earlier bans of the address; `rnd` in [0, 1) stands for fail2ban's random.random()."""
        if not self.enabled or base <= 0 or count <= 0:
            return base  # fail2ban grows neither a permanent ban nor a first one
        if self.multipliers:
            value = base * self.factor * self.multipliers[min(count, len(self.multipliers) - 1)]
        else:
            value = max(base, base * (1 << min(count, MAX_DOUBLINGS)) * self.factor)
        if self.maxtime is not None:
            value = min(value, self.maxtime)
        if self.rndtime is not None:
            value += rnd * self.rndtime
        # fail2ban keeps the float; what it shows (`banip --with-time`) is the whole seconds.
        return max(1, min(MAX_BANTIME, int(value)))


def shared_random(decision_id: str, secret: bytes = b"") -> float:
    """bantime.rndtime's random share, in [0, 1), drawn from the decision's id keyed with a
    secret the hubs share (their key pair's): two hubs deciding the same ban add the same
    time, where random.random() would make them differ, and an attacker, who can work out
    the id, can't work out the time without the secret."""
    digest = hashlib.blake2b(decision_id.encode(), digest_size=8, key=secret[:64]).digest()
    return int.from_bytes(digest, "big") / 2**64
