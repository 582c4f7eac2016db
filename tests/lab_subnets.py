"""The lab subnets of a test session (used by tests/conftest.py and the lab's own test)."""

from __future__ import annotations

import ipaddress
import os

# Distinct from the `pipeline lab up` default (10.88.0.0/24), so a user's lab can stay up.
# Overridable so that two test sessions on one machine (e.g. two developers) do not collide.
TEST_LAB_SUBNET = os.environ.get("PIPELINE_TEST_LAB_SUBNET", "10.88.200.0/24")
# The next /24 up: for the test that makes and removes a lab of its own.
SECOND_TEST_LAB_SUBNET = str(
    ipaddress.ip_network(TEST_LAB_SUBNET).network_address + 256
) + "/24"
