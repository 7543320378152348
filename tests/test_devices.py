"""Device inventories: the `devices` setting, simulated GPUs and NVML on the machine at hand."""

import dataclasses
import json
import os

import pynvml
import pytest

from jupyter_singularity.devices import (
    DeviceInfo,
    DeviceInventory,
    default_simulated_spec,
    open_inventory,
    usable_memory,
)
from jupyter_singularity.devices.simulated import SimulatedInventory
from jupyter_singularity.units import parse_size

GIB, MIB = 1024**3, 1024**2


def _nvml_driver_present() -> bool:
    """Asked of pynvml directly, so the expectation does not come from the code under test."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def _gpu_count() -> int:
    if not _nvml_driver_present():
        return 0
    pynvml.nvmlInit()
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


@pytest.mark.parametrize(
    ("spec", "sizes"),
    [
        ("simulated:2x16GiB", [16 * GIB, 16 * GIB]),
        ("simulated:16GiB,8GiB", [16 * GIB, 8 * GIB]),
        ("simulated:1x512MiB", [512 * MIB]),
        ("simulated:16GiB", [16 * GIB]),
        ("  Simulated: 3 X 1GiB ", [GIB, GIB, GIB]),
        ("simulated:16 GiB, 8GiB", [16 * GIB, 8 * GIB]),
        ("simulated:64x1GiB", [GIB] * 64),
    ],
)
def test_simulated_specs(spec: str, sizes: list[int]) -> None:
    inventory = open_inventory(spec)
    assert isinstance(inventory, DeviceInventory)
    assert inventory.kind == "simulated"
    assert inventory.simulated is True
    assert inventory.reason == ""
    devices = inventory.devices()
    assert [d.total_bytes for d in devices] == sizes
    assert [d.index for d in devices] == list(range(len(sizes)))
    assert {d.name for d in devices} == {"Simulated GPU"}
    assert {d.chip for d in devices} == {"simulated"}
    inventory.close()


def test_simulated_uuids_are_distinct_and_stable() -> None:
    first = open_inventory("simulated:3x1GiB").devices()
    second = open_inventory("simulated:1GiB,2GiB,4GiB").devices()
    assert [d.uuid for d in first] == [d.uuid for d in second]
    assert len({d.uuid for d in first}) == 3
    assert first[0].uuid == "SIM-00000000-0000-0000-0000-000000000000"
    assert first[2].uuid == "SIM-00000000-0000-0000-0000-000000000002"


def test_simulated_memory_is_left_to_the_broker() -> None:
    inventory = open_inventory("simulated:2x16GiB")
    assert inventory.memory_used(0) is None
    assert inventory.process_memory(0) == {}
    assert inventory.memory_used(7) is None
    inventory.close()
    inventory.close()


def test_devices_list_is_a_copy() -> None:
    inventory = open_inventory("simulated:2x1GiB")
    inventory.devices().clear()
    assert len(inventory.devices()) == 2


def test_device_info_is_frozen_and_serialisable() -> None:
    info = open_inventory("simulated:1x512MiB").devices()[0]
    assert json.loads(json.dumps(info.to_dict())) == {
        "index": 0,
        "uuid": info.uuid,
        "name": "Simulated GPU",
        "chip": "simulated",
        "total_bytes": 512 * MIB,
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.total_bytes = 1  # type: ignore[misc]
    assert info == DeviceInfo(**info.to_dict())  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ["gpu0", "", "nvml", "simulated", "simulated:", "cuda:0"])
def test_unknown_specs_list_what_is_accepted(spec: str) -> None:
    with pytest.raises(ValueError) as caught:
        open_inventory(spec)
    message = str(caught.value)
    assert message.startswith(f"unknown device spec {spec!r}:")
    assert "'auto'" in message
    assert "'simulated:2x16GiB'" in message


def test_unknown_spec_message_reads_well() -> None:
    with pytest.raises(ValueError) as caught:
        open_inventory("gpu0")
    assert str(caught.value).startswith(
        "unknown device spec 'gpu0': use 'auto' (NVIDIA GPUs through NVML) or "
        "'simulated:NxSIZE' such as 'simulated:2x16GiB'"
    )


@pytest.mark.parametrize("size", ["sixteen", "16XB", "-1GiB"])
def test_bad_simulated_size_gives_parse_size_message(size: str) -> None:
    with pytest.raises(ValueError) as expected:
        parse_size(size)
    for spec in (f"simulated:2x{size}", f"simulated:8GiB,{size}"):
        with pytest.raises(ValueError) as caught:
            open_inventory(spec)
        assert str(caught.value) == str(expected.value)


@pytest.mark.parametrize(
    "spec", ["simulated:0x1GiB", "simulated:65x1GiB", "simulated:10000000000000x1GiB"]
)
def test_simulated_count_out_of_range(spec: str) -> None:
    with pytest.raises(ValueError, match="between 1 and 64"):
        open_inventory(spec)


def test_simulated_size_list_too_long() -> None:
    with pytest.raises(ValueError, match="between 1 and 64, got 65"):
        open_inventory("simulated:" + ",".join(["1GiB"] * 65))


def test_simulated_zero_size_rejected() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        open_inventory("simulated:2x0GiB")


def test_auto_never_raises_and_is_consistent() -> None:
    inventory = open_inventory("auto")
    try:
        assert inventory.simulated is False
        if inventory.kind == "none":
            assert inventory.devices() == []
            assert inventory.reason
        else:
            assert inventory.kind == "nvml"
            assert inventory.devices()
            assert inventory.reason == ""
    finally:
        inventory.close()


@pytest.mark.skipif(_nvml_driver_present(), reason="needs a machine without an NVIDIA driver")
def test_auto_without_driver_is_empty_with_reason() -> None:
    inventory = open_inventory("auto")
    assert inventory.kind == "none"
    assert inventory.simulated is False
    assert inventory.devices() == []
    assert inventory.reason.startswith("no NVIDIA driver found (NVML: ")
    assert inventory.memory_used(0) is None
    assert inventory.process_memory(0) == {}
    inventory.close()
    inventory.close()
    assert inventory.memory_used(0) is None
    # Opening again after a failed init still answers instead of raising.
    again = open_inventory("auto")
    assert again.kind == "none"
    again.close()


@pytest.mark.skipif(_gpu_count() == 0, reason="needs an NVIDIA GPU")
def test_auto_with_gpus_reads_nvml() -> None:
    inventory = open_inventory("auto")
    try:
        devices = inventory.devices()
        assert inventory.kind == "nvml"
        assert len(devices) == _gpu_count()
        assert [d.index for d in devices] == list(range(len(devices)))
        for device in devices:
            assert isinstance(device.uuid, str)
            assert device.uuid.startswith(("GPU-", "MIG-"))
            assert device.chip == device.name
            assert device.total_bytes > 0
            used = inventory.memory_used(device.index)
            assert used is not None
            assert 0 <= used <= device.total_bytes
            for pid, held in inventory.process_memory(device.index).items():
                assert pid > 0
                assert 0 <= held <= device.total_bytes
        assert inventory.memory_used(len(devices)) is None
        assert inventory.process_memory(len(devices)) == {}
    finally:
        inventory.close()
    inventory.close()
    assert inventory.memory_used(0) is None
    assert inventory.process_memory(0) == {}


# ------------------------------------------------------- sizes bounded by the machine's memory


def test_a_simulated_device_larger_than_the_memory_is_refused() -> None:
    """Its state lives in host memory: 2x16GiB was the default on a 24 GiB machine."""
    with pytest.raises(ValueError) as caught:
        SimulatedInventory([16 * GIB, 8 * GIB], memory=12 * GIB)
    assert str(caught.value) == (
        "a simulated device of 16.0 GiB is larger than this machine's memory (12.0 GiB): "
        "a simulated device keeps its state in host memory"
    )
    assert SimulatedInventory([12 * GIB], memory=12 * GIB).devices()[0].total_bytes == 12 * GIB


def test_the_devices_setting_is_checked_against_this_machine() -> None:
    memory = usable_memory()
    assert memory is not None  # Linux: sysconf answers
    with pytest.raises(ValueError, match=r"larger than this machine's memory"):
        open_inventory("simulated:1x99999999TiB")
    with pytest.raises(ValueError, match=r"larger than this machine's memory"):
        open_inventory(f"simulated:1GiB,{memory + 1}")
    assert open_inventory(f"simulated:1x{memory}").devices()[0].total_bytes == memory


@pytest.mark.parametrize(
    ("memory", "spec"),
    [
        (24 * GIB, "simulated:2x3GiB"),  # the machine of the report: 6 GiB of 24 in devices
        (int(23.5 * GIB), "simulated:2x2GiB"),  # rounded down to a whole GiB
        (64 * GIB, "simulated:2x8GiB"),
        (128 * GIB, "simulated:2x16GiB"),
        (2048 * GIB, "simulated:2x16GiB"),  # at most 16 GiB
        (int(7.6 * GIB), "simulated:2x768MiB"),  # below 1 GiB: 256 MiB steps
        (2 * GIB, "simulated:2x256MiB"),
        (1 * GIB, "simulated:2x256MiB"),  # at least 256 MiB
    ],
)
def test_default_simulated_devices_take_a_quarter_of_the_memory(memory: int, spec: str) -> None:
    chosen, why = default_simulated_spec(memory)
    assert chosen == spec
    assert why.startswith("each an eighth of the ") and "at most 16.0 GiB" in why
    sizes = [d.total_bytes for d in open_inventory(chosen).devices()]
    assert len(sizes) == 2 and (sum(sizes) <= memory // 4 or sizes == [256 * MIB] * 2)


def test_default_simulated_devices_when_the_memory_is_unknown() -> None:
    assert default_simulated_spec(None) == (
        "simulated:2x1GiB",
        "the machine's memory cannot be read",
    )


def test_usable_memory_is_at_most_the_ram() -> None:
    memory = usable_memory()
    assert memory is not None
    assert 0 < memory <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
