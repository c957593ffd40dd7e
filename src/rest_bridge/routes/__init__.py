"""The bridge's POST routes, one module per contract (v1: /create-events; v2: /v2/create-events
and /v2/track), and the steps they share (rest_bridge.routes.steps)."""
