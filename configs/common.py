"""Pieces every experiment config shares: the one training-section shape and the mesh."""
import ml_collections


def train_config(*, steps, batch_size, log_every, checkpoint_every, keep_checkpoints, ema_decay,
                 learning_rate, warmup_steps, seed=0, fuse_steps=False, grad_clip=1.0, b1=0.9,
                 b2=0.99, weight_decay=0.0, divergence_factor=1e3):
  """The section ``mcm_jax.train.train`` reads (toy teacher / student, pixel and MLCM train)."""
  return ml_collections.ConfigDict(dict(
      steps=steps,
      batch_size=batch_size,  # global batch, split over the mesh's data axes
      log_every=log_every,
      # Scan log_every steps in one jitted call: far less dispatch for small models (the toy MLP).
      fuse_steps=fuse_steps,
      checkpoint_every=checkpoint_every,  # must be a multiple of log_every
      keep_checkpoints=keep_checkpoints,
      ema_decay=ema_decay,  # the EMA parameters are the ones evaluated (0: EMA = the parameters)
      seed=seed,
      # Stop (like a NaN loss, without saving) when a logged mean loss exceeds this many times the
      # loss of the untrained model (the run's first steps); 0 disables. See mcm_jax/train.py.
      divergence_factor=divergence_factor,
      # Adam(W) with a linear warmup to learning_rate; global-norm clipping (0 disables it).
      optim=dict(learning_rate=learning_rate, warmup_steps=warmup_steps, grad_clip=grad_clip,
                 b1=b1, b2=b2, weight_decay=weight_decay),
  ))


def mesh(data=-1, fsdp=1):
  """Device mesh sizes: data = -1 takes all remaining devices; fsdp > 1 shards parameters."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp))


def reading(workers=0, threads=4):
  """How host batches are read (``mcm_jax.data.loader``, a grain pipeline): ``workers`` worker
  processes building whole batches (0: the training process), ``threads`` threads per process
  each reading one batch ahead (0: read when the step asks). Neither changes a batch."""
  return ml_collections.ConfigDict(dict(workers=workers, threads=threads))
