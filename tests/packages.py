"""Optional packages in tests: skipped where absent, said as a failure where installed but broken."""

import importlib

import pytest


def optional(name: str):
    """The module `name`, imported; the calling test (or module, at import) is skipped only when the package itself
    is not installed. pytest.importorskip skips on any ImportError: an installed package whose import breaks (a
    missing dependency, an incompatible torch) would skip its tests silently and the run would read green."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        # e.name is the module that was not found: `name` or a package above it means absent; anything else (a
        # dependency it imports, a submodule of its own) means installed and broken.
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            pytest.skip(f"{name} is not installed", allow_module_level=True)
        broken = e
    except Exception as e:  # an ImportError of another kind, or anything its import raises
        broken = e
    pytest.fail(f"{name} is installed but does not import: {type(broken).__name__}: {broken}", pytrace=False)
