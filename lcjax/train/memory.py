"""Device memory for the step metrics: in use and peak, per local device, on accelerators.

`Device.memory_stats()` reports the allocator's counters on GPU and TPU; on CPU it returns None
and no memory metrics are logged.
"""

import jax

GIB = 2 ** 30


def device_memory(devices=None) -> dict[str, float]:
  """{"memory_in_use_gib/<id>": ..., "memory_peak_gib/<id>": ...} for this process's devices
  (peak: since the process started), or {} where the backend keeps no counters."""
  found = {}
  for device in devices if devices is not None else jax.local_devices():
    stats = device.memory_stats()
    if not stats:
      continue
    for name, key in (("memory_in_use_gib", "bytes_in_use"),
                      ("memory_peak_gib", "peak_bytes_in_use")):
      if key in stats:
        found[f"{name}/{device.id}"] = stats[key] / GIB
  return found
