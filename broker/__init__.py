"""The fedptr broker: a ZeroMQ ROUTER that relays requests and replies between named peers.

It reads only the envelope frames (protocol, command, name, request id) and never decodes a
body, so it imports neither torch nor the node code and starts in a fraction of a second.
"""
