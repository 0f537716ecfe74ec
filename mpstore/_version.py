"""The package's version, in a leaf module: the package root, the store's ``ping`` and the
CLI read it from here, so none of them has to import another to know it."""

__all__ = ["WIRE_VERSION", "__version__"]

__version__ = "0.2.0"

#: The version of the wire format: how requests, replies, records and packed spans are
#: pickled. A client and a server say theirs when they connect and refuse to talk if they
#: differ (mpstore.manager.channel, mpstore.manager.loop). Bump it with any change to a
#: record's fields, the packed layouts or the request/reply shapes. 1 was mpstore 0.1.0,
#: which said nothing.
WIRE_VERSION = 2
