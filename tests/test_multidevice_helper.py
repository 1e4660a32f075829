from multidevice import run_on_devices


def test_child_sees_requested_device_count():
    result = run_on_devices(
        "import json, jax; print(json.dumps(jax.local_device_count()))", devices=4, timeout=120
    )
    assert result == 4
