"""Entry point: ``python -m mcm_jax.main [--config=configs/toy.py] [--workdir=DIR]
[--mode=train|eval|plan] [--topology=NAME] [--stage=I] [--debug]``.

Bad input (a config value, an unknown ``--config.<field>``, a missing file) ends in one message
and exit code 2 before anything is written or compiled; ``mcm_jax/cli.py`` lists the exit
codes. The run's ``config.json`` is never overwritten by a different config (``write_config``).
"""
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
import warnings

from absl import flags, logging
from ml_collections import config_flags

from mcm_jax import cli, errors, experiments, storage, supervisor
from mcm_jax.config_diff import differing_fields, flat_fields
from mcm_jax.errors import ConfigError

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)  # config files import their siblings as configs.<name>
_DEFAULT_CONFIG = os.path.join(_ROOT, "configs", "toy.py")
MODES = ("train", "eval", "plan")


def define_flags(flag_values=flags.FLAGS, argv=None):
  """This program's flags; ``argv`` (default sys.argv) names the ``--config.<field>`` overrides,
  which ml_collections defines as flags of their own."""
  config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG, "Config file (a get_config() module; 'file.py:arg' passes arg).",
      flag_values=flag_values, sys_argv=argv)
  flags.DEFINE_string("workdir", "runs/toy", "Directory for checkpoints, metrics and figures.",
                      flag_values=flag_values)
  flags.DEFINE_enum("mode", "train", MODES,
                    "train: train (resuming from workdir); eval: sample from the workdir's latest "
                    "checkpoint and measure FID / FD (pixel experiment; the toy evaluates as it "
                    "trains); plan: compile the train step for --topology and report its "
                    "memory per chip and FLOPs (mcm_jax/plan.py; writes nothing unless --workdir "
                    "is given).", flag_values=flag_values)
  flags.DEFINE_string("topology", "",
                      "--mode=plan: v4-8, v5e-8/16/64/256, v5p-8, v6e-8/64/256, a libtpu spelling "
                      "such as v5e:8x8, or local (the devices present).", flag_values=flag_values)
  flags.DEFINE_integer("stage", 0,
                       "--mode=plan: the MLCM progressive stage whose step is planned (0 .. "
                       "config.mlcm.num_stages - 1; pixel configs: 0).", flag_values=flag_values)
  flags.DEFINE_string("compilation_cache", "auto",
                      "Directory (local or gs://) of JAX's persistent compilation cache, so that a "
                      "restarted run reuses its compiled programs. auto: WORKDIR/compilation_cache,"
                      " unless JAX_COMPILATION_CACHE_DIR or the calling program set one; '': off.",
                      flag_values=flag_values)
  flags.DEFINE_bool("multihost", False,
                    "Call jax.distributed.initialize() first (multi-node GPU under SLURM, TPU "
                    "pods: it reads the coordinator and process ids from the environment); the "
                    "job runs under a supervising process (mcm_jax/supervisor.py).",
                    flag_values=flag_values)
  flags.DEFINE_float("peer_timeout", 60.0,
                     "--multihost: a process that hears nothing from another for this many seconds "
                     "stops with one line naming it (exit 4; mcm_jax/peers.py) instead of JAX's "
                     "abort; 0: off.", flag_values=flag_values)


def _config_spec(argv):
  """The value of the last ``--config`` in argv ('file.py[:arg]'), or the default file."""
  spec = _DEFAULT_CONFIG
  for i, arg in enumerate(argv):
    m = re.fullmatch(r"--?config(=(.*))?", arg)
    if m and m.group(1):
      spec = m.group(2)
    elif m and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def _missing_config_file(argv):
  """A ConfigError when argv's ``--config`` file does not exist, else None."""
  spec = _config_spec(argv)
  path = spec.split(":", 1)[0]
  if os.path.isfile(path):
    return None
  return ConfigError(f"--config={spec}: config file {path!r} not found; allowed: a Python file "
                     "with get_config(), e.g. configs/toy.py")


def _config_problem(argv):
  """What is wrong with argv's config file or its ``--config.<field>`` overrides (a
  ConfigError), or None. ml_collections reports these while the flags are defined / parsed
  (before main) as bare KeyErrors, AttributeErrors or SyntaxErrors."""
  from mcm_jax import config_validation  # pylint: disable=g-import-not-at-top
  spec = _config_spec(argv)
  path, *args = spec.split(":", 1)
  loader = importlib.machinery.SourceFileLoader("mcm_jax_config_check", path)
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
  try:
    loader.exec_module(module)
  except SyntaxError as e:
    where = "" if "line" in str(e.msg) else f" (line {e.lineno})"
    return ConfigError(f"--config={spec}: {path} is not valid Python: {e.msg}{where}")
  except Exception:  # pylint: disable=broad-except
    return None  # not a problem this function names: the original error stands
  if not callable(getattr(module, "get_config", None)):
    return ConfigError(f"--config={spec}: {path} has no get_config(); allowed: a config module "
                       "such as configs/toy.py")
  try:
    config = module.get_config(*args)
  except Exception:  # pylint: disable=broad-except
    return None
  for arg in argv:
    m = re.match(r"--?(no)?config\.([^=]+)", arg)
    if m:
      source = os.path.relpath(spec, _ROOT) if spec == _DEFAULT_CONFIG else spec
      error = config_validation.unknown_field_error(config, m.group(2), source=source)
      if error is not None:
        return error
  return None


def parse_flags(argv, flag_values=flags.FLAGS):
  """Defines and parses this program's flags (absl's flags_parser). A missing or broken config
  file, or an override of a field the config does not have, is a ConfigError naming it (with
  the close matches of an unknown field)."""
  argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)  # --flagfile, as ml_collections
  missing = _missing_config_file(argv)
  if missing is not None:
    raise missing
  try:
    define_flags(flag_values, argv)
    return cli.parse_flags(argv, flag_values)
  except (AttributeError, KeyError, SyntaxError) as e:
    problem = _config_problem(argv)
    if problem is None:
      raise
    raise problem from e


def checked_config(flag_values=flags.FLAGS):
  """The parsed config, validated (ConfigError naming the field, the value and what is allowed),
  with the other flags checked too: all before anything is written or compiled."""
  from mcm_jax import config_validation  # pylint: disable=g-import-not-at-top
  config = flag_values.config
  config_validation.validate(config, plan=flag_values.mode == "plan")
  if flag_values.mode == "eval" and not hasattr(experiments.get(config.experiment), "evaluate"):
    raise ConfigError(f"--mode=eval is for the pixel experiment; config.experiment="
                      f"{config.experiment!r} evaluates at the end of training (use --mode=train)")
  if flag_values.stage != 0 and flag_values.mode != "plan":
    raise errors.UserError(f"--stage={flag_values.stage} is for --mode=plan; --mode="
                           f"{flag_values.mode} runs every stage (allowed: leave --stage out)")
  if flag_values.mode == "plan":
    from mcm_jax import plan  # pylint: disable=g-import-not-at-top
    if experiments.trains_one_step(config.experiment):  # plan.plan names the others
      plan.check_stage(config, flag_values.stage)
  workdir = flag_values.workdir
  if not workdir or (storage.exists(workdir) and not storage.isdir(workdir)):
    raise errors.UserError(f"--workdir={workdir!r} is invalid; allowed: a directory (created if "
                           "missing), local or an object-store URL such as gs://bucket/run")
  return config


def _read_json(path):
  try:
    return storage.read_json(path)
  except ValueError:
    return None  # unreadable: differs from any config


def write_config(workdir, config, mode="train"):
  """Writes ``config`` as JSON into ``workdir`` and returns the path. ``--mode=eval``:
  ``config_eval.json``. Training: ``config.json``, which is never overwritten by a different
  config: a config that differs from it is written beside it as ``config_<N>.json`` (N the next
  free number) with a warning naming the settings that differ; an identical config (to
  ``config.json`` or to a ``config_<N>.json``) is not written again."""
  text = config.to_json_best_effort(indent=1)
  path = os.path.join(workdir, "config_eval.json" if mode == "eval" else "config.json")
  if mode == "train" and storage.exists(path):
    new = json.loads(text)
    old = _read_json(path)
    names = storage.listdir(workdir)
    numbered = sorted((int(m.group(1)), m.group(0)) for m in
                      (re.fullmatch(r"config_(\d+)\.json", n) for n in names) if m)
    for candidate in [path] + [os.path.join(workdir, name) for _, name in numbered]:
      if _read_json(candidate) == new:
        return candidate
    diff = differing_fields(flat_fields(old or {}), flat_fields(new))
    path = os.path.join(workdir, f"config_{numbered[-1][0] + 1 if numbered else 1}.json")
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:12])
    logging.warning("%s is kept: this run's config differs from it in %d setting(s) (%s%s); "
                    "it is written to %s", os.path.join(workdir, "config.json"), len(diff), shown,
                    "; ..." if len(diff) > 12 else "", path)
  storage.write_text(path, text)
  return path


def use_compilation_cache(setting, workdir):
  """Points JAX's persistent compilation cache at ``setting`` ('auto': ``workdir``/
  compilation_cache unless one is set already; '': off) before anything compiles; returns the
  directory used, or '' for none."""
  import jax  # pylint: disable=g-import-not-at-top
  if setting == "auto":
    setting = (jax.config.jax_compilation_cache_dir
               or os.path.join(workdir, "compilation_cache"))
  if setting and setting != jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", setting)
  return setting


def main(argv):
  del argv
  warnings.filterwarnings("ignore", category=DeprecationWarning)
  # Orbax logs every save step at INFO; keep the console for progress and results.
  logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)
  flag_values = flags.FLAGS
  if flag_values.multihost and flag_values.mode != "plan" and not supervisor.supervised():
    # This command again, as its child, which checks the config as below; the supervisor itself
    # never imports JAX.
    sys.exit(supervisor.run(flag_values.workdir))
  config = checked_config()  # before anything is written or compiled
  if flag_values.mode == "plan":
    from mcm_jax import plan  # pylint: disable=g-import-not-at-top
    plan.run(config, flag_values.topology,
             flag_values.workdir if flag_values["workdir"].present else None, flag_values.stage)
    return
  write, done = True, lambda: None
  if flag_values.multihost:
    done = initialize_distributed(flag_values.peer_timeout, flag_values.workdir)
    import jax  # pylint: disable=g-import-not-at-top
    write = jax.process_index() == 0
  workdir, mode = flag_values.workdir, flag_values.mode
  storage.makedirs(workdir)
  cache = use_compilation_cache(flag_values.compilation_cache, workdir)
  logging.info("persistent compilation cache: %s", cache or "off")
  if write:
    write_config(workdir, config, mode)
  logging.info("config:\n%s", config)
  experiment = experiments.get(config.experiment)  # validate() admits only experiments.MODULES
  (experiment.evaluate if mode == "eval" else experiment.run)(config, workdir)
  done()


def initialize_distributed(peer_timeout, workdir):
  """``jax.distributed.initialize()`` (the cluster found from the environment), then the lost-peer
  watchdog (``peers``, unless ``peer_timeout`` is 0), with JAX's own heartbeat timeout set
  beyond it. Returns the watchdog's ``done``."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  from mcm_jax import peers  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(heartbeat_timeout_seconds=int(max(100, 3 * peer_timeout)))
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  if not peer_timeout or jax.process_count() == 1:
    return lambda: None
  return peers.start(distributed.global_state.client, jax.process_index(), jax.process_count(),
                     peer_timeout, workdir)


if __name__ == "__main__":
  cli.run(main, parse_flags)
