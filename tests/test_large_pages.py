"""Large pages for the memory the tensor tier copies into (see kernel/large_pages.py): the engine's
own host buffers, and on simulated devices the "device" memory a restore refills. A copy into
fresh memory in 4 KiB pages pays 262,144 page faults per GiB; in transparent huge pages, 512.

Checked on the mappings themselves: ``/proc/self/smaps`` flags a region advised for huge pages
with ``hg``. Skipped where the system has transparent huge pages off.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jupyter_singularity.kernel.offload import TensorEngine

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(
    not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here"
)

MiB = 1 << 20

#: The smaps flags of the mapping that holds an address (run in this process or in a kernel).
FLAGS_AT = """
def flags_at(address):
    region = None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(part, 16) for part in head.split("-"))
            region = low <= address < high
        elif head == "VmFlags:" and region:
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")
"""
namespace: dict = {}
exec(FLAGS_AT, namespace)
flags_at = namespace["flags_at"]


def test_an_offload_copies_into_host_buffers_in_large_pages() -> None:
    tensors = [torch.full((16 * MiB // 4,), float(i)) for i in range(4)]
    engine = TensorEngine(simulated=True, pinned_limit=0)
    engine.offload()
    try:
        buffers = [b.tensor for b in engine._tape.buffers if b.tensor is not None]
        assert buffers
        for buffer in buffers:
            assert "hg" in flags_at(buffer.data_ptr()), "host buffer not advised for huge pages"
    finally:
        engine.restore()
    assert all(bool((t == i).all()) for i, t in enumerate(tensors))


@pytest.fixture
def singularity_devices() -> str:
    return "simulated:1x1GiB"


async def test_a_simulated_restore_refills_in_large_pages_and_leaves_cells_allocations_alone(
    start_kernel, wait_in_pool, run, jp_fetch, state
):
    """The "device" memory a restore refills is advised for huge pages (in the whole large pages
    within each storage); a tensor a cell makes is not: its memory is as in any process."""
    kernel = await start_kernel()
    await wait_in_pool([kernel])
    setup = FLAGS_AT + (
        "import torch\n"
        "def advised(t):\n"
        "    return 'hg' in flags_at(-(-t.data_ptr() // (2 << 20)) * (2 << 20))\n"
        "x = torch.ones(64 << 18)\n"
        "print('flags', advised(x))"
    )
    status, out, _ = await run(kernel, setup, timeout=120)
    assert status == "ok", out
    assert out.split("flags")[-1].split() == ["False"], out
    await jp_fetch("singularity", "api", "kernels", kernel, "offload", method="POST", body="{}")
    await state(kernel, "offloaded")
    status, out, _ = await run(kernel, "print('flags', advised(x), bool((x == 1).all()))")
    assert status == "ok", out
    assert out.split("flags")[-1].split() == ["True", "True"], out
