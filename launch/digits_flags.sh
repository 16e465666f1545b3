# The digits demo's run settings, sourced by launch/digits_table.sh and launch/digits_guided.sh:
# a tiny UViT base model (1,500 steps at batch 64) and CD students from it (600 steps each).
BASE_FLAGS=(--config=configs/imagenet64_base.py:tiny
            --config.train.steps=1500 --config.train.batch_size=64 --config.train.log_every=100
            --config.train.checkpoint_every=500 --config.train.ema_decay=0.995
            --config.sample.num=64 "--config.sample.teacher_steps=(4,64)")
CD_FLAGS=(--config=configs/imagenet64_cd.py:tiny
          --config.train.steps=600 --config.train.batch_size=64 --config.train.log_every=100
          --config.train.checkpoint_every=300 --config.train.ema_decay=0.99
          --config.train.optim.learning_rate=2e-4 --config.consistency.teacher_steps_horizon=300
          --config.sample.num=64)
