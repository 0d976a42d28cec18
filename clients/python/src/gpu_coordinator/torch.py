"""Moving a model off the GPU and back for a pause, without importing torch unless used.

```python
from gpu_coordinator.torch import offload, reload

async def on_pause(order):
    await offload(model)          # to CPU, cache freed, memory returned to the driver

async def on_resume(order):
    await reload(model, "cuda:0")
```
"""

from __future__ import annotations

import asyncio
from typing import Any


async def offload(module: Any, timeout: float = 30.0) -> None:
    """Moves `module` to the CPU, frees PyTorch's CUDA cache, and waits until the memory PyTorch
    reserved on the GPU is given back (at most `timeout` seconds)."""
    import torch  # type: ignore[import-not-found, unused-ignore]

    device = next((p.device for p in module.parameters() if p.is_cuda), None)
    module.to("cpu")
    if device is None or not torch.cuda.is_available():
        return
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    loop = asyncio.get_running_loop()
    until = loop.time() + timeout
    while torch.cuda.memory_reserved(device) > 0 and loop.time() < until:
        torch.cuda.empty_cache()
        await asyncio.sleep(0.05)


async def reload(module: Any, device: Any) -> None:
    """Moves `module` back to `device` (e.g. `"cuda:0"`), off the event loop's thread."""
    await asyncio.get_running_loop().run_in_executor(None, module.to, device)
