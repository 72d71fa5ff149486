"""Device mesh from the config and named sharding rules for state and batches.

Mesh: axes ('data', 'expert') of sizes (mesh.data, mesh.expert), product =
number of devices (all processes'); mesh.data = -1 takes the devices the
expert axis leaves (the default: pure data parallelism over every device).
Batches are split over *both* axes on their leading (batch) axis: every
device holds different tokens. Expert weights [E, ...] are split over
'expert' (E / expert experts per device, replicated over 'data'); everything
else is replicated. The MoE layer uses the expert-parallel path
(model/expert_parallel.py) whenever it is traced under `jax.set_mesh(mesh)`
with mesh.expert > 1.

Rules are (regex, PartitionSpec) pairs matched with `re.search` against a
leaf's path ("params/block_1/moe/w_in", "opt_state/0/mu/block_1/moe/w_in");
the first match wins and unmatched leaves are replicated. Optimizer moments
mirror the params' paths, so they get the params' shardings.
"""

import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "expert")
BATCH_SPEC = P(AXES)  # leading axis over every device
RULES = (
    (r"(^|/)moe/w_(in|out)$", P("expert")),  # expert weights [E, ...]
)


def make_mesh(mesh_cfg, num_experts: int = 0, devices: Sequence | None = None) -> Mesh:
  """Mesh ('data', 'expert') from a config with `data` and `expert` sizes.

  data = -1 is the number of devices / expert. Raises ValueError when data *
  expert != number of devices, or when the experts cannot be split evenly
  over the expert axis.
  """
  devices = list(jax.devices() if devices is None else devices)
  data, expert = mesh_cfg.data, mesh_cfg.expert
  if expert < 1 or (data < 1 and data != -1):
    raise ValueError(f"mesh: axis sizes must be >= 1, or data=-1 for every device "
                     f"(got data={data}, expert={expert})")
  if data == -1:
    if len(devices) % expert:
      raise ValueError(f"mesh.expert: must divide the number of devices ({len(devices)}) "
                       f"when mesh.data=-1 (got {expert})")
    data = len(devices) // expert
  if data * expert != len(devices):
    raise ValueError(f"mesh: data * expert = {data} * {expert} = {data * expert} must equal "
                     f"the number of devices ({len(devices)})")
  if num_experts and num_experts % expert:
    raise ValueError(f"mesh.expert: must divide model.num_experts={num_experts} "
                     f"(got {expert})")
  return jax.make_mesh((data, expert), AXES, (AxisType.Auto,) * 2, devices=devices)


def path_str(path) -> str:
  """'a/b/0/c' from a jax tree path."""
  def key(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return "/".join(key(k) for k in path)


def spec_for(path: str, shape, mesh: Mesh, rules=RULES) -> P:
  """PartitionSpec of one leaf: the first matching rule, else replicated."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      for dim, axis in zip(shape, spec):
        if axis is not None and dim % mesh.shape[axis]:
          raise ValueError(f"mesh: {path} with shape {tuple(shape)} cannot be split over "
                           f"'{axis}' of size {mesh.shape[axis]}")
      return spec
  return P()


def tree_shardings(tree, mesh: Mesh, rules=RULES):
  """NamedShardings for a pytree of arrays / ShapeDtypeStructs by the rules."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, spec_for(path_str(path), np.shape(x), mesh, rules)),
      tree)


def shard(tree, mesh: Mesh, rules=RULES):
  """Places a pytree of arrays on `mesh` by the rules."""
  return jax.device_put(tree, tree_shardings(tree, mesh, rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  if batch_size % mesh.size:
    raise ValueError(f"data.batch_size: must be divisible by the {mesh.size} devices of the "
                     f"mesh {dict(mesh.shape)} (got {batch_size})")


def shard_batch(batch_BxL, mesh: Mesh):
  """Global host batch (the same on every process) -> array split over the mesh.

  Each process only materialises the rows of its own devices, so this works
  unchanged with several processes.
  """
  batch_BxL = np.asarray(batch_BxL)
  return jax.make_array_from_callback(batch_BxL.shape, batch_sharding(mesh),
                                      lambda index: batch_BxL[index])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def init_sharded(init_fn, mesh: Mesh, rules=RULES):
  """Runs `init_fn()` (e.g. the train-state init) jitted so that every leaf is
  created directly with its rule's sharding. Returns (tree, shardings)."""
  shardings = tree_shardings(jax.eval_shape(init_fn), mesh, rules)
  return jax.jit(init_fn, out_shardings=shardings)(), shardings
