"""REST bridge: the JSON contract of POST /create-events, translated to gRPC."""
