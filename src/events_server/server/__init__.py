"""The gRPC events server: settings, the servicers, authentication, validation, the
dedup-and-enqueue store (one Redis or a cluster), the rejected record, readiness,
metrics and access logs. Start it with ``events-server serve``."""
