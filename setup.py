from setuptools import setup

# The commands live in command_line/ and install as the package `diffnet`,
# so command_line/predict.py is both `diffnet.predict` and `python -m diffnet.predict`.
COMMANDS = ["predict", "filter", "simulate", "train", "evaluate"]

setup(
    name="dials-diffnet",
    version="0.1.0",
    description="Deep-learning judgement of diffraction images inside DIALS",
    packages=[
        "dials_diffnet",
        "dials_diffnet.models",
        "dials_diffnet.simulate",
        "dials_diffnet.spi",
        "dials_diffnet.weights",
        "dials_diffnet.phil",
        "diffnet",
    ],
    package_dir={"diffnet": "command_line", "dials_diffnet.phil": "phil"},
    package_data={
        "dials_diffnet.weights": ["*.safetensors", "*.json"],
        "dials_diffnet.phil": ["*.phil"],
    },
    install_requires=["numpy", "torch==2.13.0", "safetensors", "h5py"],
    entry_points={
        "console_scripts": [f"diffnet.{c} = diffnet.{c}:run" for c in COMMANDS]
    },
    python_requires=">=3.11",
)
