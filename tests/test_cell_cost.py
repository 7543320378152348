"""What a cell costs a kernel of the pool: no walk of the user's whole Python heap on the cell path.

Through a real jupyter_server and a real kernel on a simulated device, where the kernel's "device"
state is its large CPU tensors. A walk of every live object (``gc.get_objects()`` without a
generation) costs tens of milliseconds per 100k objects; the kernel counts them here.
"""

from __future__ import annotations

import gc

from cells import record_of

MiB = 1 << 20

# Every walk of the whole heap, by thread: the kernel's own code looks up gc.get_objects on the
# gc module at each call, so it is counted too.
COUNT_WALKS = """
import gc, threading
_get_objects = gc.get_objects
walks = []
def _counted(generation=None):
    if generation is None:
        walks.append(threading.current_thread().name)
        return _get_objects()
    return _get_objects(generation)
gc.get_objects = _counted
"""


async def test_cells_that_change_the_footprint_and_restored_cells_walk_no_heap(
    start_kernel, wait_in_pool, execute, get_pool, state, jp_fetch
):
    kernel = await start_kernel()
    await wait_in_pool(kernel)
    status, out = await execute(kernel, "import torch\nx = torch.ones(MiB := 1 << 20)\nheap = []")
    assert status == "ok", out
    status, out = await execute(kernel, COUNT_WALKS)
    assert status == "ok", out

    # Cells whose allocations move the kernel's footprint by megabytes, in a heap that grows.
    for size in (1, 2, 1, 2):
        code = f"y = torch.ones({size} * MiB)\nheap += [[i] for i in range(50_000)]"
        status, out = await execute(kernel, code)
        assert status == "ok", out
    status, out = await execute(kernel, "big = torch.ones(16 * MiB)")
    assert status == "ok", out
    expected = (1 + 2 + 16) * 4 * MiB  # x, y and big, float32

    async def footprint(kernel_id: str) -> dict:
        return await state(kernel_id, "resident")

    pool = await footprint(kernel)
    assert record_of(pool, kernel)["gpu_bytes"] == expected, record_of(pool, kernel)
    status, out = await execute(kernel, "print(walks)")
    assert status == "ok" and out.strip() == "[]", out

    # Offloaded by the broker (the offload looks for every tensor, on the push worker), then a
    # cell restores the state: neither the restore nor the cell's end walks the heap.
    await jp_fetch("singularity", "api", "kernels", kernel, "offload", method="POST", body="{}")
    await state(kernel, "offloaded")
    status, out = await execute(kernel, "z = torch.ones(MiB)\nprint(float(big.sum()))")
    assert status == "ok" and out.strip() == str(float(16 * MiB)), out
    pool = await footprint(kernel)
    assert record_of(pool, kernel)["gpu_bytes"] == expected + 4 * MiB, record_of(pool, kernel)
    status, out = await execute(kernel, "print(walks.count('MainThread'), len(walks))")
    assert status == "ok", out
    on_cells, walks = map(int, out.split())
    assert on_cells == 0 and walks >= 1, out


def test_live_tensors_sees_tensors_created_after_it_started_and_forgets_dead_ones():
    import torch

    from jupyter_singularity.kernel.footprint import LiveTensors

    def large(holder) -> list[int]:
        storage = holder if isinstance(holder, torch.UntypedStorage) else holder.untyped_storage()
        return [storage._cdata] if storage.nbytes() >= 4000 else []

    live = LiveTensors((torch.Tensor, torch.UntypedStorage), large)
    before = torch.zeros(3)
    live.start()
    try:
        live.take_changed()
        promoted = torch.ones(5)
        gc.collect()  # a full collection: everything young is promoted to the oldest generation
        young = [torch.ones(7) for _ in range(3)]
        assert not live.take_changed()  # only small tensors came
        found = {id(obj) for obj in live.objects()}
        assert {id(before), id(promoted), *map(id, young)} <= found
        gone = id(young.pop())
        assert not live.take_changed()  # and went
        assert gone not in {id(obj) for obj in live.objects()}
        large = torch.ones(1000)
        assert live.take_changed() and not live.take_changed()
        view = large[10:]  # another holder of the same storage: no change, nor when it goes
        assert not live.take_changed()
        del view
        assert not live.take_changed()
        del large
        assert live.take_changed()
    finally:
        live.stop()


def test_the_footprint_follows_tensors_where_the_process_memory_does_not_move(monkeypatch):
    """malloc hands a freed tensor's memory to the next one without the process's mapped or
    resident bytes moving: the footprint must follow the tensors all the same."""
    import torch

    from jupyter_singularity.kernel import footprint
    from jupyter_singularity.kernel.offload import TensorEngine

    monkeypatch.setattr(footprint, "memory_probe", lambda: lambda: (1 << 30, 1 << 29))
    engine = TensorEngine(simulated=True, pinned_limit=0, min_bytes=MiB)
    measured = footprint.Footprint(MiB)
    base = measured.measure(engine)
    y = torch.ones(MiB)  # 4 MiB
    assert measured.measure(engine) == base + 4 * MiB
    y = torch.ones(2 * MiB)
    assert measured.measure(engine) == base + 8 * MiB
    del y
    assert measured.measure(engine) == base
    measured.close()


def test_a_request_leaves_before_the_caller_goes_on_with_the_gil():
    """An acquire sent as ipykernel starts preparing a cell must leave at once, even though the
    preparing thread does not give the GIL up by itself: the client sends it on the calling
    thread, not through another thread that would need the GIL."""
    import secrets
    import sys

    import zmq

    from jupyter_singularity.kernel.client import BrokerClient

    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = BrokerClient(f"tcp://127.0.0.1:{port}", "k1", secrets.token_bytes(32))
    client.start()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(30.0)  # the I/O thread gets the GIL only when this thread blocks
    try:
        answer = client.submit("acquire", {"request_id": "r1"})
        sent = answer.msg_id in client._sent  # no blocking call in between: the GIL stays here
    finally:
        sys.setswitchinterval(interval)
        client.close()
        router.close()
    assert sent


def test_a_restore_returns_before_its_host_copy_is_given_back(monkeypatch):
    """Giving 1 GiB back to the system takes tens of ms, with the GIL held when torch frees it:
    the host copy of a restored state goes on a thread of its own, after the restore returned."""
    import threading

    import torch

    from jupyter_singularity.kernel import offload

    released = threading.Event()
    unmapped: list[tuple[str, int]] = []

    def unmap(mappings):
        released.wait(10)
        unmapped.extend((threading.current_thread().name, len(m)) for m in mappings)
        for mapping in mappings:
            mapping.close()

    monkeypatch.setattr(offload, "_unmap", unmap, raising=False)
    engine = offload.TensorEngine(simulated=True, pinned_limit=0, min_bytes=MiB)
    tensors = [torch.arange(MiB, dtype=torch.float32) * i for i in range(3)]
    engine.offload()
    assert all(t.untyped_storage().nbytes() == 0 for t in tensors)
    transfer = engine.restore()
    assert unmapped == []  # the restore returned; its host copy is still being given back
    assert all(
        torch.equal(t, torch.arange(MiB, dtype=torch.float32) * i) for i, t in enumerate(tensors)
    )
    released.set()
    for thread in threading.enumerate():
        if thread.name == "singularity-unmap":
            thread.join(10)
    assert unmapped and {name for name, _ in unmapped} == {"singularity-unmap"}
    assert sum(size for _, size in unmapped) >= transfer.nbytes
    engine.discard()
