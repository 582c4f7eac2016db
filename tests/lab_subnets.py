"""The lab subnets of a test session (used by tests/conftest.py and the lab's own test).

Under pytest-xdist every worker is a session with a lab of its own, so each worker takes its
own pair of /24s: worker gwN starts 2*N /24s above the base (the pair is the session's lab and
the one `tests/lab/test_lab.py` makes and removes)."""

from __future__ import annotations

import ipaddress
import os

# Distinct from the `pipeline lab up` default (10.88.0.0/24), so a user's lab can stay up.
# Overridable so that two test sessions on one machine (e.g. two developers) do not collide.
_BASE = ipaddress.ip_network(os.environ.get("PIPELINE_TEST_LAB_SUBNET", "10.88.200.0/24"))
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
_OFFSET = 2 * int(_WORKER.removeprefix("gw") or 0) * 256

TEST_LAB_SUBNET = f"{_BASE.network_address + _OFFSET}/24"
# The next /24 up: for the test that makes and removes a lab of its own.
SECOND_TEST_LAB_SUBNET = f"{_BASE.network_address + _OFFSET + 256}/24"
