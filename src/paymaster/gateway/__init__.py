"""The gateway's parts: routing (which connector serves a host, SSRF rules), forwarding
(the pooled upstream client, header hygiene), metering (usage → cost → commit or release),
the response headers, and the per-request flow that ties them together.

The Starlette routes live in :mod:`paymaster.server.gateway`.
"""
