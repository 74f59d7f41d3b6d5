"""The internal-address rule exists in Python (the DTMA client) and SQL (recording a command):
both get the same table of addresses, so the two cannot drift apart."""

from __future__ import annotations

import ipaddress

import psycopg
import pytest

from shared.core.addresses import INTERNAL_NETWORKS, is_internal


def _edges() -> list[str]:
    """The first and last address of every refused network, and the addresses just outside."""
    cases: list[str] = []
    for text in INTERNAL_NETWORKS:
        net = ipaddress.ip_network(text)
        cases += [str(net.network_address), str(net.broadcast_address)]
        for outside in (int(net.network_address) - 1, int(net.broadcast_address) + 1):
            if 0 <= outside < 2 ** net.max_prefixlen:
                cases.append(str(ipaddress.ip_address(outside) if net.version == 4 else ipaddress.IPv6Address(outside)))
    return cases


PUBLIC = ["8.8.8.8", "1.1.1.1", "203.0.114.1", "100.128.0.1", "172.32.0.1", "2606:4700:4700::1111",
          "2001:4860:4860::8888"]
INTERNAL = ["127.0.0.1", "10.1.2.3", "169.254.169.254", "192.168.0.5", "100.64.0.1", "192.0.0.8", "192.0.2.1",
            "::1", "fd00::1", "fe80::1", "::ffff:10.0.0.1", "64:ff9b::a00:1", "2002:a00:1::", "2001:db8::1"]


def test_the_table_covers_what_must_be_refused_and_what_must_not() -> None:
    assert all(is_internal(ipaddress.ip_address(a)) for a in INTERNAL)
    assert not any(is_internal(ipaddress.ip_address(a)) for a in PUBLIC)


@pytest.mark.parametrize("address", sorted(set(_edges() + PUBLIC + INTERNAL)))
def test_python_and_sql_agree(pg: psycopg.Connection, address: str) -> None:
    in_sql = pg.execute("select cp_private.cp_address_is_internal(%s::inet)", (address,)).fetchone()[0]
    assert in_sql == is_internal(ipaddress.ip_address(address)), address
