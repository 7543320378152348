"""What the broker needs to know about a GPU, independent of where that knowledge comes from."""

import abc
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceInfo:
    """One GPU as the pool sees it; frozen because the hardware does not change under us."""

    index: int
    uuid: str
    name: str
    # Kernels may only migrate between GPUs of the same chip, so this is compared verbatim.
    chip: str
    total_bytes: int

    def to_dict(self) -> dict[str, int | str]:
        """Plain data for the REST API, the event log and every grant (where ``asdict``, which
        deep-copies each field, cost a tenth of the broker's time per lease)."""
        return dict(self.__dict__)


class DeviceInventory(abc.ABC):
    """A source of GPUs (real, simulated or none) behind one interface for the broker.

    The memory queries default to "unknown": backends that cannot observe live usage
    leave the accounting to the broker's own books.
    """

    def __init__(self, kind: str, reason: str = "") -> None:
        self.kind = kind
        # Why there are no devices, shown to users instead of an empty GPU list.
        self.reason = reason

    @property
    def simulated(self) -> bool:
        """True when the devices are fake, so the UI can say so."""
        return self.kind == "simulated"

    @abc.abstractmethod
    def devices(self) -> list[DeviceInfo]:
        """All devices, in a stable order that does not change while the inventory is open."""

    def memory_used(self, index: int) -> int | None:
        """Bytes in use on the device right now, or None when that cannot be observed."""
        return None

    def process_memory(self, index: int) -> dict[int, int]:
        """Bytes held on the device per pid; empty when unknown."""
        return {}

    @abc.abstractmethod
    def close(self) -> None:
        """Release whatever the backend holds; must be safe to call more than once."""
