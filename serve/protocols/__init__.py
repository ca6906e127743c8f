"""One adapter per API style; each translates its wire format to and from the engine's seam."""

from serve.protocols.common import ApiError, Hub

__all__ = ["ApiError", "Hub"]
