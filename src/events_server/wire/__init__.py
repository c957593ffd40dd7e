"""What every process agrees on: metadata names, the JSON<->protobuf codec, event rules,
field violations, origins and the rejected-record caps.

Imports only protobuf (and google.rpc's protos) and the standard library, so the client,
the bridge and the server can all share it.
"""
