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
from .errors import CoordinatorError, GrantTimeout, LeaseLost, Rejected, Unavailable

__all__ = [
    "Client",
    "CoordinatorError",
    "GrantTimeout",
    "Lease",
    "LeaseLost",
    "PauseOrder",
    "Rejected",
    "ResumeOrder",
    "Unavailable",
]
