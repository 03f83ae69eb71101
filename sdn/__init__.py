"""Spatial Dependency Networks (Miladinović et al., ICLR 2021).

The layers are importable on their own::

    from sdn import SDNLayer, ResSDNLayer
"""

from typing import Any

__all__ = ["SDNLayer", "ResSDNLayer"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Loaded on first use: every pipeline stage imports this package, and the data stages neither
    # need torch's layers nor should re-run when sdn/layers.py changes.
    if name in ("SDNLayer", "ResSDNLayer"):
        from sdn import layers

        return getattr(layers, name)
    raise AttributeError(f"module 'sdn' has no attribute {name!r}")
