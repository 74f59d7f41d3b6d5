"""Addresses the backend never sends a toolbox key to, and never probes.

A user who could point their toolbox at one of these would make the backend talk to itself, its
own network or a cloud metadata service (SSRF). The rule exists twice, here and in SQL
(`cp_address_is_internal`, sql/migrations/0006_deploy_and_manage.sql, checked when a command is
recorded); tests/test_addresses.py feeds both the same table of addresses, so they cannot drift.
Everything that is not globally routable is refused: private, shared (CGNAT), loopback,
link-local, documentation, benchmarking, multicast, reserved, and the IPv6 forms that embed or
translate an IPv4 address.
"""

from __future__ import annotations

import ipaddress

INTERNAL_NETWORKS: tuple[str, ...] = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001::/23",
    "2001:db8::/32", "2002::/16", "fc00::/7", "fe80::/10", "ff00::/8",
)
_NETWORKS = tuple(ipaddress.ip_network(n) for n in INTERNAL_NETWORKS)


def is_internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(address.version == net.version and address in net for net in _NETWORKS)
