"""mcm_jax: Multistep Consistency Models (MCM) and multistep latent consistency (MLCM) in JAX.

Core = what the toy default, the samplers, the objectives and the training loop need.
Extras are for the heavy paths, each with the reason for its pins.
"""
from setuptools import find_packages, setup

CORE = [
    # jax 0.10.2 + flax 0.12.8 + optax 0.2.8 + orbax 0.12.x were checked together on CPU.
    # jax >= 0.10 is required: the code uses jax.tree_util, AxisType-aware meshes, jax.nn APIs.
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12,<0.13",
    "ml_collections>=1.1.0",
    "absl-py",
    # clu installs without TensorFlow; its metric writers need TF (see the tensorboard extra);
    # without it mcm_jax.metric_writer falls back to a console + JSON-lines writer.
    "clu>=0.0.12",
    # Host input (mcm_jax/data/loader.py): grain's MapDataset / IterDataset API (0.2.x; the
    # dataset API still changes between minor releases), checked at 0.2.18.
    "grain>=0.2.18,<0.3",
    "numpy",
    "matplotlib",  # PNG sample grids and trajectory figures
    "pillow",
]

EXTRAS = {
    # clu.metric_writers / periodic_actions import tensorflow (~1.3 GB): opt in for TensorBoard.
    "tensorboard": ["tensorflow-cpu", "tensorboard"],
    # ImageNet through tfds from a local data dir, by random access (tfds.data_source over
    # array_record files): works without tensorflow (tfds' tf.data pipelines would need it).
    "imagenet": ["tensorflow-datasets>=4.9,<5", "array_record"],
    # SDXL in Flax: diffusers >= 0.40 and transformers >= 5 no longer ship Flax classes.
    # (peft only for PyTorch-side LoRA loading in tests; pyarrow for .parquet prompt files.)
    "sdxl": ["diffusers>=0.30,<0.40", "transformers>=4.40,<5", "safetensors", "pyarrow"],
    # gs:// workdirs (TPU pods): mcm_jax.storage reaches gs:// through etils.epath, whose backend
    # without TensorFlow is fsspec's gcsfs; orbax's checkpointer asks google-cloud-storage about
    # the bucket (hierarchical namespace) before listing steps.
    "gcs": ["gcsfs", "google-cloud-storage"],
    # --mode=plan for TPU topologies: libtpu compiles for abstract TPU chips on any machine (no
    # TPU needed). Pinned to the release that jax[tpu]==0.10.2 pins; another libtpu may not load
    # into this jaxlib. (On a TPU VM this is also the runtime.) Linux wheels, ~210 MB.
    "tpu": ["libtpu==0.0.42.*"],
    # The pixel CPU demo: scikit-learn ships 1,797 real 8x8 digit images inside its wheel.
    "demo": ["scikit-learn>=1.3"],
    # Tests. The FID Inception is checked against pytorch-fid's network, which needs torchvision,
    # and t2i_eval's FID resize against clean-fid's (clean-fid 0.1.35: its resizer is read, none
    # of its downloads run).
    # torch and torchvision are pinned as a pair: PyPI's torchvision wheels do not import beside
    # a CPU-only torch build ("operator torchvision::nms does not exist"), and 2.14.1 / 0.29.1 is
    # the pair this project's machines hold locally (a CUDA build, ~5.5 GB, that runs on CPU;
    # ~1 min to install from that local copy). An unpinned torch pulls whatever is newest.
    # The SDXL UNet and LoRA export are checked against diffusers' PyTorch classes (LoRA loading
    # there needs peft).
    # pytest-xdist: the suite runs one test module per core (pytest.ini), the longest first
    # (--no-loadscope-reorder, from 3.7; else xdist orders modules by test count).
    # open_clip_torch: the reference for the open_clip -> transformers CLIP conversion (HPSv2),
    # and its wheel ships CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz); nothing is
    # downloaded.
    "test": ["pytest>=8", "pytest-xdist>=3.7", "scikit-learn>=1.3", "scipy",
             "tensorflow-datasets>=4.9,<5", "array_record",
             "torch==2.14.1", "torchvision==0.29.1", "pytorch-fid==0.3.0", "clean-fid==0.1.35",
             "diffusers>=0.30,<0.40", "transformers>=4.40,<5", "safetensors", "peft>=0.15",
             "pyarrow", "open_clip_torch>=2.20",
             # tests/test_plan.py compiles for abstract TPUs ("tpu"; Linux wheels only)
             "libtpu==0.0.42.*; sys_platform == 'linux'",
             "fsspec"],  # tests/fake_gcs.py: a local stand-in for gs:// (fsspec's DirFileSystem)
}

# The full-size SDXL rehearsal (launch/sdxl_rehearsal.sh): the test stack (PyTorch references,
# and open_clip_torch, whose wheel's BPE vocabulary benchmarks/make_random_sdxl.py builds the
# real tokenizers from).
EXTRAS["rehearsal"] = EXTRAS["test"]

setup(
    name="mcm_jax",
    version="0.1.0",
    description="Multistep Consistency Models (MCM, MLCM) in JAX/Flax",
    packages=find_packages(include=["mcm_jax", "mcm_jax.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
)
