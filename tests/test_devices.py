"""devices.py: the XLA_FLAGS request before JAX starts, and the one device order every writer uses."""

from __future__ import annotations

import os
import sys

import jax

from jaxreshard.devices import cpu_devices_in_rank_order, request_cpu_devices


def test_the_request_is_added_to_the_users_flags(monkeypatch):
    monkeypatch.delitem(sys.modules, "jax")  # as if JAX had not started yet
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    request_cpu_devices(4)
    assert sys.modules.get("jax") is None
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"


def test_a_count_the_user_set_wins_and_zero_asks_for_one(monkeypatch):
    monkeypatch.delitem(sys.modules, "jax")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    request_cpu_devices(16)
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    monkeypatch.delenv("XLA_FLAGS")
    request_cpu_devices(0)
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"


def test_nothing_changes_once_jax_has_started(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    request_cpu_devices(4)
    assert os.environ["XLA_FLAGS"] == ""


def test_rank_order_is_process_then_id():
    devices = cpu_devices_in_rank_order()
    assert len(devices) == 8  # tests/conftest.py
    assert [(d.process_index, d.id) for d in devices] == sorted((d.process_index, d.id) for d in jax.devices("cpu"))
