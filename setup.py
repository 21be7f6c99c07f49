# kernels/ lives at the repository root (the project's layout) but is installed only as the
# subpackage peftfast.kernels: a top-level `kernels` module would shadow the Hugging Face package
# of that name, which transformers and bitsandbytes probe for.
from setuptools import setup

setup(
    packages=["peftfast", "peftfast.cli", "peftfast.layers", "peftfast.prompt_learning", "peftfast.devtools", "peftfast.kernels", "peftfast.kernels.configs", "peftfast.kernels.experimental"],
    package_dir={
        "peftfast": "peftfast",
        "peftfast.kernels": "kernels",
        "peftfast.kernels.configs": "kernels/configs",
        "peftfast.kernels.experimental": "kernels/experimental",
    },
    package_data={"peftfast.kernels.configs": ["*.json"], "peftfast": ["data/*"]},
    include_package_data=True,
)
