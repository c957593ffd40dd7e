"""Redis plumbing shared by the server, the consumer library and the CLI: key names,
connecting, Lua scripts, and reading the partition streams back in order."""
