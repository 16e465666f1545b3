"""Entry point: ``python -m mcm_jax.main [--config=configs/toy.py] [--workdir=DIR]
[--mode=train|eval]``."""
import os
import sys
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

from mcm_jax.config_validation import validate

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)  # config files import their siblings as configs.<name>
_DEFAULT_CONFIG = os.path.join(_ROOT, "configs", "toy.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                "Config file (a get_config() module; 'file.py:arg' passes arg).")
flags.DEFINE_string("workdir", "runs/toy", "Directory for checkpoints, metrics and figures.")
flags.DEFINE_enum("mode", "train", ["train", "eval"],
                  "train: train (resuming from workdir); eval: sample from the workdir's latest "
                  "checkpoint and measure FID / FD (pixel experiment; the toy evaluates as it "
                  "trains).")
flags.DEFINE_bool("multihost", False,
                  "Call jax.distributed.initialize() first (multi-node GPU under SLURM, TPU pods: "
                  "it reads the coordinator and process ids from the environment).")


def main(argv):
  del argv
  warnings.filterwarnings("ignore", category=DeprecationWarning)
  # Orbax logs every save step at INFO; keep the console for progress and results.
  logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
  if flags.FLAGS.multihost:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
  config = flags.FLAGS.config
  validate(config)  # before anything is written or compiled
  workdir = flags.FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  mode = flags.FLAGS.mode
  with open(os.path.join(workdir, "config.json" if mode == "train" else "config_eval.json"),
            "w") as f:
    f.write(config.to_json_best_effort(indent=1))
  logging.info("config:\n%s", config)
  if mode == "eval" and config.experiment != "pixel":
    raise app.UsageError(f"--mode=eval is for the pixel experiment; config.experiment="
                         f"{config.experiment!r} evaluates at the end of training")
  if config.experiment == "toy":
    from mcm_jax.experiments import toy  # pylint: disable=g-import-not-at-top
    toy.run(config, workdir)
  elif config.experiment == "pixel":
    from mcm_jax.experiments import pixel  # pylint: disable=g-import-not-at-top
    (pixel.evaluate if mode == "eval" else pixel.run)(config, workdir)
  else:  # "mlcm": validate() admits only config_validation.EXPERIMENTS
    from mcm_jax.experiments import sdxl_mlcm  # pylint: disable=g-import-not-at-top
    sdxl_mlcm.run(config, workdir)

if __name__ == "__main__":
  app.run(main)
