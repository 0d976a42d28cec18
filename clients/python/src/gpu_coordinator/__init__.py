"""The Python client of GPU Coordinator.

```python
from gpu_coordinator import Client

client = await Client.connect("nats://127.0.0.1:4222", service="chat", prefix="gpu")
async with client.lease(priority=0, vram_mb=20000, timeout_ms=30000) as lease:
    ...  # lease.gpu, lease.fence, lease.request_id; check lease.usable() before each unit of work
await client.close()
```
"""

from ._client import Client, Lease, PauseOrder, ResumeOrder
from .documents import ControlDoc, GpuStatus, HostStatus, ReplyDoc, StatusDoc
from .errors import (
    LEASE_GONE,
    CoordinatorError,
    GrantTimeout,
    LeaseLost,
    Rejected,
    RejectCode,
    Unavailable,
)

__all__ = [
    "Client",
    "ControlDoc",
    "CoordinatorError",
    "GpuStatus",
    "GrantTimeout",
    "HostStatus",
    "LEASE_GONE",
    "Lease",
    "LeaseLost",
    "PauseOrder",
    "RejectCode",
    "Rejected",
    "ReplyDoc",
    "ResumeOrder",
    "StatusDoc",
    "Unavailable",
]
