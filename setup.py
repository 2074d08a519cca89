"""Package discovery that pyproject.toml alone cannot express.

Every package under generator/, generated/ and puzzletron_runtime/ is found automatically (a newly
generated descriptor needs no packaging change), and the top-level templates/ directory ships
inside the generator as ``generator.templates``, so a non-editable install finds it through
importlib.resources.
"""

from setuptools import find_packages, setup

ROOTS = ("generator", "generated", "puzzletron_runtime")

setup(
    packages=find_packages(include=[f"{r}*" for r in ROOTS]) + ["generator.templates"],
    package_dir={"generator.templates": "templates"},
)
