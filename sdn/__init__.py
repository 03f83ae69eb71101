"""Spatial Dependency Networks (Miladinović et al., ICLR 2021).

The layers are importable on their own::

    from sdn import SDNLayer, ResSDNLayer
"""

from sdn.layers import ResSDNLayer, SDNLayer

__all__ = ["SDNLayer", "ResSDNLayer"]
__version__ = "0.1.0"
