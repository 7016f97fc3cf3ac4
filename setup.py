"""Build script. Everything declarative lives in pyproject.toml; this file exists for the
optional compiled backend, which is added here when it lands (it must never be required)."""
from setuptools import setup

setup()
