"""The cluster in place of the session's single Valkey, for the tests of this folder."""

from tests.harness.cluster import channel, grpc_server, keys, rdb, settings, stub  # noqa: F401
