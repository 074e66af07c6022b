from setuptools import find_packages, setup

setup(
    name="megatron_mm1",
    version="0.1.0",
    description="MM1-style multimodal LLM training on megatron-core",
    packages=find_packages(include=["megatron_mm1", "megatron_mm1.*"]),
    python_requires=">=3.11",
    # Versions are pinned in requirements.txt; torch is installed first by `make install`.
    install_requires=["torch", "megatron-core", "PyYAML", "numpy", "tqdm"],
    entry_points={"console_scripts": ["mm1=megatron_mm1.cli:main"]},
)
