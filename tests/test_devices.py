"""Device inventories: the `devices` setting, simulated GPUs and NVML on the machine at hand."""

import dataclasses
import json
import os

import pynvml
import pytest

from jupyter_singularity.broker.settings import inventory_line
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


@pytest.mark.gpu
def test_auto_with_gpus_reads_nvml() -> None:
    inventory = open_inventory("auto")
    try:
        devices = inventory.devices()
        assert inventory.kind == "nvml"
        assert devices  # every GPU (or MIG instance) this server was given
        assert [d.index for d in devices] == list(range(len(devices)))
        for device in devices:
            assert isinstance(device.uuid, str)
            assert device.uuid.startswith(("GPU-", "MIG-"))
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


# ------------------------------------------------------------------- NVML, through a fake pynvml

H100_A = "GPU-6f1c2a3b-4d5e-6f70-8192-a3b4c5d6e7f8"
H100_B = "GPU-00112233-4455-6677-8899-aabbccddeeff"
A100 = "GPU-a1000000-0000-0000-0000-000000000001"
MIG_1 = "MIG-11111111-2222-3333-4444-555555555555"
MIG_2 = "MIG-66666666-7777-8888-9999-000000000000"


@dataclasses.dataclass
class FakeDevice:
    """One device as the fake NVML lists it: a GPU (``instances`` when in MIG mode), or a MIG
    instance; ``broken`` names the query that fails for it."""

    name: str
    uuid: str
    total: int
    instances: list["FakeDevice | None"] | None = None
    broken: str = ""
    processes: list[tuple[int, int | None]] = dataclasses.field(default_factory=list)


class FakeNvml:
    """pynvml's functions over a list of fake GPUs; the real module's error classes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, gpus: list[FakeDevice]) -> None:
        self.gpus = gpus
        self.initialized = 0
        self.v3_missing = False
        for name in (
            "nvmlInit",
            "nvmlShutdown",
            "nvmlDeviceGetCount",
            "nvmlDeviceGetHandleByIndex",
            "nvmlDeviceGetName",
            "nvmlDeviceGetUUID",
            "nvmlDeviceGetMemoryInfo",
            "nvmlDeviceGetMigMode",
            "nvmlDeviceGetMaxMigDeviceCount",
            "nvmlDeviceGetMigDeviceHandleByIndex",
            "nvmlDeviceGetComputeRunningProcesses",
            "nvmlDeviceGetComputeRunningProcesses_v2",
        ):
            monkeypatch.setattr(pynvml, name, getattr(self, name))

    @staticmethod
    def _check(device: FakeDevice, query: str) -> None:
        if device.broken == query:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)

    def nvmlInit(self) -> None:
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self.initialized -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        device = self.gpus[index]
        self._check(device, "handle")
        return device

    def nvmlDeviceGetName(self, device: FakeDevice) -> bytes:
        self._check(device, "name")
        return device.name.encode()  # old pynvml versions return bytes

    def nvmlDeviceGetUUID(self, device: FakeDevice) -> str:
        return device.uuid

    def nvmlDeviceGetMemoryInfo(self, device: FakeDevice) -> object:
        self._check(device, "memory")
        return type("Memory", (), {"total": device.total, "used": device.total // 4})()

    def nvmlDeviceGetMigMode(self, device: FakeDevice) -> list[int]:
        if device.instances is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [pynvml.NVML_DEVICE_MIG_ENABLE] * 2

    def nvmlDeviceGetMaxMigDeviceCount(self, device: FakeDevice) -> int:
        return len(device.instances or [])

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: FakeDevice, slot: int) -> FakeDevice:
        instance = (device.instances or [])[slot]
        if instance is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return instance

    def _processes(self, device: FakeDevice) -> list[object]:
        return [
            type("Process", (), {"pid": pid, "usedGpuMemory": used})()
            for pid, used in device.processes
        ]

    def nvmlDeviceGetComputeRunningProcesses(self, device: FakeDevice) -> list[object]:
        if self.v3_missing:  # what pynvml raises where the driver lacks the _v3 query
            raise pynvml.NVMLLibraryMismatchError("Unversioned function called ...")
        return self._processes(device)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, device: FakeDevice) -> list[object]:
        return self._processes(device)


def _h100s() -> list[FakeDevice]:
    return [
        FakeDevice("NVIDIA H100 80GB HBM3", H100_A, 80 * GIB),
        FakeDevice("NVIDIA H100 80GB HBM3", H100_B, 80 * GIB),
    ]


@pytest.fixture
def no_visible_devices_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.mark.usefixtures("no_visible_devices_setting")
def test_nvml_lists_every_gpu_without_a_visible_devices_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeNvml(monkeypatch, _h100s())
    inventory = open_inventory("auto")
    assert [(d.index, d.uuid, d.name, d.chip, d.total_bytes) for d in inventory.devices()] == [
        (0, H100_A, "NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3", 80 * GIB),
        (1, H100_B, "NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3", 80 * GIB),
    ]
    assert (inventory.kind, inventory.reason) == ("nvml", "")
    assert inventory.memory_used(1) == 20 * GIB
    inventory.close()
    assert fake.initialized == 0


@pytest.mark.parametrize(
    ("visible", "uuids", "reason"),
    [
        ("1", [H100_B], ""),
        (H100_B, [H100_B], ""),
        (f" {H100_B} ,0", [H100_B, H100_A], ""),  # CUDA's order: the server's cuda:0 comes first
        ("GPU-0011", [H100_B], ""),  # a unique prefix, as CUDA accepts
        ("gpu-6F1C2A3B", [H100_A], ""),
        ("0,0", [H100_A], ""),
        (
            "0,7,1",
            [H100_A],
            "CUDA_VISIBLE_DEVICES='0,7,1': entry '7' names no GPU here; like CUDA, the pool "
            "ignores it and the entries after it",
        ),
        ("", [], "CUDA_VISIBLE_DEVICES='' gives this server no GPU"),
        (
            "-1",
            [],
            "CUDA_VISIBLE_DEVICES='-1' gives this server no GPU (entry '-1' names no GPU here)",
        ),
        (
            "GPU-",
            [],
            "CUDA_VISIBLE_DEVICES='GPU-' gives this server no GPU (entry 'GPU-' names no GPU here)",
        ),
        (
            "NoDevFiles",
            [],
            "CUDA_VISIBLE_DEVICES='NoDevFiles' gives this server no GPU (entry 'NoDevFiles' names no GPU here)",
        ),
    ],
)
def test_nvml_honours_the_servers_visible_devices(
    monkeypatch: pytest.MonkeyPatch, visible: str, uuids: list[str], reason: str
) -> None:
    """Slurm and hub spawners give a server its GPUs this way: the pool must not hand out others."""
    FakeNvml(monkeypatch, _h100s())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    inventory = open_inventory("auto")
    devices = inventory.devices()
    assert [d.uuid for d in devices] == uuids
    assert [d.index for d in devices] == list(range(len(uuids)))
    assert inventory.reason == reason
    assert inventory.kind == ("nvml" if uuids else "none")
    inventory.close()


def test_an_ambiguous_uuid_prefix_names_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    twin = "GPU-6f1c0000-0000-0000-0000-000000000000"
    FakeNvml(monkeypatch, [*_h100s(), FakeDevice("NVIDIA H100 80GB HBM3", twin, 80 * GIB)])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-6f1c")  # H100_A and the twin
    assert open_inventory("auto").devices() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-6f1c2")
    assert [d.uuid for d in open_inventory("auto").devices()] == [H100_A]


@pytest.mark.usefixtures("no_visible_devices_setting")
@pytest.mark.parametrize("query", ["handle", "name", "memory"])
def test_one_unreadable_gpu_is_left_out_with_a_reason(
    monkeypatch: pytest.MonkeyPatch, query: str
) -> None:
    gpus = _h100s()
    gpus[0].broken = query
    FakeNvml(monkeypatch, gpus)
    inventory = open_inventory("auto")
    assert [(d.index, d.uuid) for d in inventory.devices()] == [(0, H100_B)]
    assert inventory.reason == "GPU 0 left out: NVML cannot read it (Unknown Error)"
    inventory.close()


@pytest.mark.usefixtures("no_visible_devices_setting")
def test_no_readable_gpu_gives_an_empty_pool_saying_why(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = _h100s()
    for gpu in gpus:
        gpu.broken = "memory"
    fake = FakeNvml(monkeypatch, gpus)
    inventory = open_inventory("auto")
    assert (inventory.devices(), inventory.kind) == ([], "none")
    assert inventory.reason == (
        "GPU 0 left out: NVML cannot read it (Unknown Error); "
        "GPU 1 left out: NVML cannot read it (Unknown Error)"
    )
    assert fake.initialized == 0  # shut down again: an empty inventory holds nothing


@pytest.mark.usefixtures("no_visible_devices_setting")
def test_no_gpu_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml(monkeypatch, [])
    inventory = open_inventory("auto")
    assert (inventory.devices(), inventory.reason) == ([], "NVIDIA driver found but no GPU")


def _mig_machine() -> list[FakeDevice]:
    return [
        FakeDevice(
            "NVIDIA A100-SXM4-40GB",
            A100,
            40 * GIB,
            instances=[
                FakeDevice("NVIDIA A100-SXM4-40GB MIG 3g.20gb", MIG_1, 20 * GIB),
                None,  # an empty slot
                FakeDevice("NVIDIA A100-SXM4-40GB MIG 2g.10gb", MIG_2, 10 * GIB),
            ],
        ),
        FakeDevice("NVIDIA H100 80GB HBM3", H100_A, 80 * GIB),
    ]


@pytest.mark.usefixtures("no_visible_devices_setting")
def test_a_gpu_in_mig_mode_is_its_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml(monkeypatch, _mig_machine())
    devices = open_inventory("auto").devices()
    assert [(d.index, d.uuid, d.name, d.total_bytes) for d in devices] == [
        (0, MIG_1, "NVIDIA A100-SXM4-40GB MIG 3g.20gb", 20 * GIB),
        (1, MIG_2, "NVIDIA A100-SXM4-40GB MIG 2g.10gb", 10 * GIB),
        (2, H100_A, "NVIDIA H100 80GB HBM3", 80 * GIB),
    ]
    # The driver tier cannot remap a MIG instance: no two instances share a chip, so the pool
    # never restores a kernel onto another one.
    assert len({d.chip for d in devices}) == 3


@pytest.mark.parametrize(
    ("visible", "uuids"),
    [
        ("0", [MIG_1, MIG_2]),  # the GPU by index: its instances
        (A100, [MIG_1, MIG_2]),
        (MIG_2, [MIG_2]),
        ("MIG-1111", [MIG_1]),
        (f"{MIG_2},1", [MIG_2, H100_A]),
    ],
)
def test_visible_devices_name_mig_instances(
    monkeypatch: pytest.MonkeyPatch, visible: str, uuids: list[str]
) -> None:
    FakeNvml(monkeypatch, _mig_machine())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert [d.uuid for d in open_inventory("auto").devices()] == uuids


@pytest.mark.usefixtures("no_visible_devices_setting")
def test_process_memory_with_an_older_driver_uses_the_older_query(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus = _h100s()
    gpus[1].processes = [(4242, 3 * GIB), (4243, None), (4242, GIB)]
    fake = FakeNvml(monkeypatch, gpus)
    inventory = open_inventory("auto")
    assert inventory.process_memory(1) == {4242: 4 * GIB}
    fake.v3_missing = True  # pynvml raises NVMLLibraryMismatchError, not an NVMLError
    assert inventory.process_memory(1) == {4242: 4 * GIB}
    monkeypatch.delattr(pynvml, "nvmlDeviceGetComputeRunningProcesses_v2")
    assert inventory.process_memory(1) == {}


@pytest.mark.usefixtures("no_visible_devices_setting")
def test_the_start_line_names_the_gpus_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = _h100s()
    gpus[0].broken = "memory"
    FakeNvml(monkeypatch, gpus)
    line = inventory_line(open_inventory("auto"), "--SingularityApp.devices")
    assert line == (
        "jupyter-singularity: pooling 1 NVIDIA GPU: 0: NVIDIA H100 80GB HBM3 (80.0 GiB) "
        "(GPU 0 left out: NVML cannot read it (Unknown Error))"
    )
