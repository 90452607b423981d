"""The node's choice of Fast DDS transports: set only when the user has chosen nothing."""

from __future__ import annotations

import pytest

from facial_perception.ros.perception_node import FASTDDS_TRANSPORTS, prefer_large_data_transport


def test_sets_large_data_when_nothing_is_chosen() -> None:
    env: dict[str, str] = {}
    assert prefer_large_data_transport(env) == FASTDDS_TRANSPORTS == "LARGE_DATA"
    assert env == {"FASTDDS_BUILTIN_TRANSPORTS": "LARGE_DATA"}


def test_explicit_fast_dds_rmw_gets_it_too() -> None:
    env = {"RMW_IMPLEMENTATION": "rmw_fastrtps_cpp"}
    assert prefer_large_data_transport(env) == "LARGE_DATA"
    assert env["FASTDDS_BUILTIN_TRANSPORTS"] == "LARGE_DATA"


@pytest.mark.parametrize(
    "env",
    [
        {"FASTDDS_BUILTIN_TRANSPORTS": "DEFAULT"},
        {"FASTDDS_BUILTIN_TRANSPORTS": "UDPv4"},
        {"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"},
        {"RMW_IMPLEMENTATION": "rmw_zenoh_cpp"},
        {"FASTDDS_DEFAULT_PROFILES_FILE": "/etc/fastdds.xml"},
        {"FASTRTPS_DEFAULT_PROFILES_FILE": "/etc/fastrtps.xml"},
    ],
)
def test_never_overrides_a_users_choice(env: dict[str, str]) -> None:
    before = dict(env)
    assert prefer_large_data_transport(env) is None
    assert env == before
