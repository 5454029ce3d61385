"""The address ranges every ban is checked against, without a socket."""

import ipaddress

import pytest

from f2bzmq.addresses import SPECIAL_PURPOSE, Allowlist, special_purpose


@pytest.mark.parametrize(
    "ip, kind",
    [
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("169.254.169.254", "link-local"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("240.0.0.1", "reserved and broadcast"),
        ("255.255.255.255", "reserved and broadcast"),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fe80::/64", "link-local"),
        ("febf:ffff::1", "link-local"),
        ("ff02::1", "multicast"),
        ("126.0.0.0/7", "loopback"),  # a network that holds a special range
        ("1.0.0.0", None),
        ("10.0.0.5", None),  # private networks hold attackers too
        ("192.168.1.7", None),
        ("100.64.0.1", None),
        ("192.0.2.10", None),  # documentation ranges: tests and examples ban them
        ("198.51.100.0/24", None),
        ("223.255.255.255", None),
        ("126.255.255.255", None),
        ("169.253.255.255", None),
        ("2001:db8::1", None),
        ("fec0::1", None),
        ("::2", None),
        ("64:ff9b::192.0.2.1", None),
    ],
)
def test_special_purpose_ranges_are_named(ip, kind):
    assert special_purpose(ip) == kind


def test_special_purpose_ranges_are_what_ipaddress_calls_them():
    for network, kind in SPECIAL_PURPOSE:
        first = network.network_address
        flag = {
            "unspecified": "is_unspecified",
            "link-local": "is_link_local",
            "reserved and broadcast": "is_reserved",
        }.get(kind)
        flag = flag or f"is_{kind.replace('-', '_')}"
        if kind == "unspecified" and network.version == 4:
            assert first.is_unspecified  # 0.0.0.0/8 also holds "this host on this network"
        else:
            assert getattr(first, flag) and getattr(network.broadcast_address, flag), network


def test_an_allowlist_of_the_special_purpose_ranges_covers_what_they_hold():
    allowlist = Allowlist(network for network, _ in SPECIAL_PURPOSE)
    assert allowlist.covers("169.254.169.254") and allowlist.covers("ff02::1")
    assert not allowlist.covers("203.0.113.7")
    assert allowlist.covers(str(ipaddress.ip_network("224.0.0.0/24")))


def test_an_allowlist_of_many_networks_answers_like_a_scan_of_them():
    import random

    rng = random.Random(3)
    networks = [
        ipaddress.ip_network(
            f"{rng.randrange(1, 224)}.{rng.randrange(256)}.0.0/{rng.choice((16, 20, 24))}",
            strict=False,
        )
        for _ in range(300)
    ] + [ipaddress.ip_network(f"2001:db8:{n:x}::/48") for n in range(0, 300, 7)]
    allowlist = Allowlist(networks)
    for _ in range(3000):
        if rng.random() < 0.8:
            ip = ".".join(
                str(rng.randrange(1, 224) if n == 0 else rng.randrange(256)) for n in range(4)
            )
            if rng.random() < 0.3:
                ip = str(ipaddress.ip_network(f"{ip}/{rng.choice((12, 18, 24, 28))}", strict=False))
        else:
            ip = f"2001:db8:{rng.randrange(300):x}::{rng.randrange(1, 9)}"
        target = ipaddress.ip_network(ip, strict=False)
        expected = any(net.version == target.version and net.overlaps(target) for net in networks)
        assert allowlist.covers(ip) == expected, ip
