"""Data-parallel decoding: independent rows split over local devices.

Rows of a batch never interact while decoding (beams interact only within
their prompt), so B prompts split into `n` equal blocks, one per device, and
each device runs the whole decode (prefill and its own `lax.while_loop`) over
its block with no communication; a device stops when its own rows are done.

    rows_fn = split_rows(rows_fn, n)      # jax.shard_map over a 1-D 'rows' mesh
    params = replicate(params, n)         # the same weights on every device

Why this matters on CPU: one device runs the ops of a decode step one after
the other, most of them on one core, so a batch on one device leaves the
other cores idle; host devices (`--xla_force_host_platform_device_count=C`,
one per core) each run a block concurrently. They all stream the weights
every step, so `replicate` gives every CPU device the *same* host buffer (a
zero-copy view; the arrays are immutable): with a copy per device the bytes
streamed through the shared cache double (docs/performance.md). On
accelerators it is a plain replicated `device_put`.

Caches are not split here: each device builds its own for its rows inside
the function, from the cache spec's `split(num_devices)` (model/cache.py).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "rows"


@functools.lru_cache(maxsize=None)
def rows_mesh(num_devices: int) -> Mesh:
  """1-D mesh over the first `num_devices` local devices, axis 'rows'."""
  devices = jax.local_devices()
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f"num_devices={num_devices}: this process has {len(devices)} devices")
  return Mesh(np.array(devices[:num_devices]), (AXIS,))


def auto_num_devices(num_rows: int) -> int:
  """The most local devices (<= jax.local_device_count()) that divide num_rows."""
  return max(d for d in range(1, jax.local_device_count() + 1) if num_rows % d == 0)


def split_rows(fn, num_devices: int, replicated_args: tuple = ()):
  """fn(*args) with every argument and output split along axis 0 over devices.

  Args at the positions in `replicated_args` (weights, scalars) are passed
  whole to every device. Every output leaf has the rows as axis 0; the
  results of the devices are concatenated in device order (row order).
  With num_devices == 1, `fn` itself.
  """
  if num_devices == 1:
    return fn
  mesh = rows_mesh(num_devices)

  @functools.wraps(fn)
  def wrapped(*args):
    in_specs = tuple(P() if i in replicated_args else P(AXIS) for i in range(len(args)))
    # check_vma=False: each device's while_loop carry starts from constants
    # and becomes row-dependent; nothing here is a collective.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(AXIS),
                         check_vma=False)(*args)
  return wrapped


def replicate(tree, num_devices: int):
  """Places every leaf of `tree` whole on each device of `rows_mesh(num_devices)`.

  CPU devices share the host's memory, so they get one buffer: the leaf on
  the first device and zero-copy views of it on the others. Elsewhere a
  replicated `device_put`. With num_devices == 1, `tree` unchanged.
  """
  if num_devices == 1:
    return tree
  mesh = rows_mesh(num_devices)
  sharding = NamedSharding(mesh, P())
  devices = list(mesh.devices.flat)
  if devices[0].platform != "cpu":
    return jax.device_put(tree, sharding)

  def one(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    first = jax.device_put(x, devices[0])
    host = np.asarray(first)  # a view of `first`'s buffer (CPU), no copy
    views = [jax.device_put(host, d) for d in devices[1:]]  # zero-copy on CPU
    return jax.make_array_from_single_device_arrays(np.shape(x), sharding, [first, *views])
  return jax.tree.map(one, tree)
