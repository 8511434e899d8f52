"""Test setup: 8 fake CPU devices, set before anything imports jax."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402 - after the environment above, before anything imports jax


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """The example Llama checkpoint (complete safetensors), written once per test session."""
    from jaxreshard.example import write_llama_checkpoint

    return write_llama_checkpoint(tmp_path_factory.mktemp("llama") / "model.safetensors")
