"""Package metadata and dependencies.

`pip install .` installs the dependencies only, no Python packages: the toolkit's folders
have generic names (`utils`, `training`, `inference`) that would collide with other
projects' modules in site-packages. The code runs from the repository root (README)."""
from pathlib import Path

from setuptools import setup


def requirements() -> list[str]:
    lines = Path(__file__).with_name("requirements.txt").read_text().splitlines()
    reqs = [line.split("#")[0].strip() for line in lines]
    return [r for r in reqs if r and not r.startswith("pytest")]


setup(
    name="rlhfkit",
    version="0.1.0",
    description="InstructGPT-style RLHF (SFT, reward model, PPO) on DeepSpeed, CPU or GPU",
    packages=[],
    py_modules=[],
    install_requires=requirements(),
    extras_require={"test": ["pytest"]},
    python_requires=">=3.10",
)
