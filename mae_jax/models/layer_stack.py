"""A stack of transformer blocks, as a Python loop or as one `nn.scan`, optionally
rematerialised, and the conversion of parameters between the two layouts.

Unrolled, an encoder's blocks are parameters `block0` ... `block{n-1}` (the official layout,
which weights convert to and from). Scanned (`model.scan_layers`), XLA compiles one block
instead of n and the parameters are stacked along a leading layer axis under `blocks`;
`stack_layers` / `unstack_layers` convert any tree of them (parameters, optimizer moments),
so a checkpoint restores in either layout. `remat` ('block' or 'dots') recomputes a block's
activations in the backward pass instead of keeping them: memory for compute.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.models.layers import LN_EPS, Block


class ScanBlock(Block):
  """A Block as one step of `nn.scan`: (x, this layer's drop-path rate) -> (x, None)."""
  deterministic: bool = True

  def __call__(self, x, drop_rate):
    return super().__call__(x, self.deterministic, drop_rate), None


def block_stack(x, depth: int, drop_rates, *, num_heads: int, mlp_ratio: float, dtype,
                attention_impl, remat: str, scan: bool, deterministic: bool = True,
                ln_eps: float = LN_EPS):
  """`depth` pre-norm blocks over x (called inside a compact module). Unrolled, their parameters
  are `block0` ... `block{depth-1}`; with `scan`, one `nn.scan` whose parameters are stacked
  along a leading layer axis under `blocks` (one block to compile instead of `depth`;
  `stack_layers` / `unstack_layers` convert between the two)."""
  if not scan:
    for i in range(depth):
      x = block_type(remat)(num_heads, mlp_ratio, float(drop_rates[i]), dtype, attention_impl,
                            ln_eps, name=f"block{i}")(x, deterministic)
    return x
  scanned = nn.scan(block_type(remat, scan=True), variable_axes={"params": 0},
                    split_rngs={"params": True, "dropout": True}, in_axes=0, length=depth)
  x, _ = scanned(num_heads, mlp_ratio, 0.0, dtype, attention_impl, ln_eps,
                 deterministic=deterministic, name="blocks")(x, jnp.asarray(drop_rates, jnp.float32))
  return x


def _is_block_name(key) -> bool:
  return isinstance(key, str) and key.startswith("block") and key[5:].isdigit()


def _stack(leaves):
  if isinstance(leaves[0], jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + leaves[0].shape, leaves[0].dtype)
  stack = np.stack if isinstance(leaves[0], np.ndarray) else jnp.stack
  return stack(leaves)


def stack_layers(tree):
  """Unrolled -> scanned layout: every dict holding `block0` ... `block{n-1}` gets them stacked
  leaf by leaf into `blocks`. Works on any pytree holding parameter-shaped dicts (parameters,
  optimizer moments) whose leaves are arrays or ShapeDtypeStructs."""
  def convert(node):
    if not isinstance(node, dict):
      return node
    blocks = sorted((k for k in node if _is_block_name(k)), key=lambda k: int(k[5:]))
    out = {k: convert(v) for k, v in node.items() if not _is_block_name(k)}
    if blocks:
      out["blocks"] = jax.tree.map(lambda *xs: _stack(xs), *[node[k] for k in blocks])
    return out
  return jax.tree.map(convert, tree, is_leaf=lambda x: isinstance(x, dict))


def unstack_layers(tree):
  """Scanned -> unrolled layout: the inverse of `stack_layers`."""
  def take(x, i):
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return x[i]

  def convert(node):
    if not isinstance(node, dict):
      return node
    out = {k: convert(v) for k, v in node.items() if k != "blocks"}
    if "blocks" in node:
      depth = jax.tree.leaves(node["blocks"])[0].shape[0]
      for i in range(depth):
        out[f"block{i}"] = jax.tree.map(lambda x: take(x, i), node["blocks"])
    return out
  return jax.tree.map(convert, tree, is_leaf=lambda x: isinstance(x, dict))


def is_scanned(params) -> bool:
  """Whether a parameter tree holds scanned (`blocks`) layers."""
  return any(isinstance(v, dict) and "blocks" in v for v in params.values())


# What a rematerialised block keeps for the backward pass ('none': everything, no remat).
REMAT_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,  # only the block's input; all recomputed
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # the matmul outputs too
}


def block_type(remat: str = "none", scan: bool = False):
  """`Block` (`ScanBlock` for nn.scan), or with `remat` 'block' / 'dots' its rematerialised form
  (same parameters), whose activations are recomputed in the backward pass instead of kept:
  memory for compute."""
  block = ScanBlock if scan else Block
  if remat == "none":
    return block
  # static_argnums counts self: Block's argument 2 is `deterministic`, a Python bool (ScanBlock
  # holds it as a field).
  return nn.remat(block, policy=REMAT_POLICIES[remat], static_argnums=() if scan else (2,))

