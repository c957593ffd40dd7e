"""The shared test machinery: real servers started for the tests, the data they send.

- ``valkey``: the one Valkey launcher (the tests', ``make run``'s and ``make bench``'s)
- ``cluster``: a 3-node Valkey cluster, and the fixtures that put it in place of one Valkey
- ``servers``: the gRPC server and the bridge in the test's process
- ``processes``: the gRPC server, the bridge and the commands as child processes
- ``proxy``: the one TCP fault proxy (Valkey's RESP or gRPC's HTTP/2)
- ``browser``: Debian's headless Chromium under Playwright, and pages of other origins
- ``data``, ``rpc``, ``web``, ``keys``: events, gRPC calls, HTTP to the bridge, API keys
- ``streams``: the one stream dumper, and the rejected-requests record
- ``consumers``, ``consumer_worker``: consumers under test, and a consumer process
- ``fuzz``: hypothesis' settings for arbitrary requests, and each gRPC answer judged
- ``load``, ``metrics``, ``waiting``: retrying and fixed-rate load, scrapes, polling
- ``ws``: a client of the bridge's WebSocket endpoint, as Depict's client behaves
- ``tls``: throwaway certificates as files, HTTPS client contexts, a TLS front for Valkey
"""
