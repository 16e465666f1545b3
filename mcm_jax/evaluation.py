"""Sample-based distances between two point clouds (toy evaluation)."""
import jax
import jax.numpy as jnp


def _mean_pairwise_distance(a, b, exclude_diagonal, block=1024):
  """``mean_{i,j} |a_i - b_j|`` computed in row blocks (memory O(block * len(b)))."""
  n = a.shape[0] // block * block
  a_blocks = a[:n].reshape(-1, block, a.shape[1])

  def block_sum(args):
    idx, rows = args
    d = jnp.sqrt(jnp.maximum(
        jnp.sum(rows ** 2, 1)[:, None] + jnp.sum(b ** 2, 1)[None] - 2 * rows @ b.T, 0.0))
    if exclude_diagonal:
      cols = jnp.arange(b.shape[0])[None]
      d = jnp.where(cols == (idx * block + jnp.arange(block))[:, None], 0.0, d)
    return jnp.sum(d)

  total = jnp.sum(jax.lax.map(block_sum, (jnp.arange(a_blocks.shape[0]), a_blocks)))
  pairs = n * b.shape[0] - (n if exclude_diagonal else 0)
  return total / pairs


@jax.jit
def energy_distance(x, y):
  """Unbiased energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (diagonals excluded).

  Both inputs [N, D] float (N a multiple of 1024 is used in full; extra rows are dropped).
  Zero in expectation when the distributions are equal, positive otherwise.
  """
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  return (2 * _mean_pairwise_distance(x, y, False)
          - _mean_pairwise_distance(x, x, True)
          - _mean_pairwise_distance(y, y, True))
