"""Webhooks from git hosts: who sent a delivery and whether its signature holds
(`signatures`, checked over the raw body before anything is parsed), what it announces
(`payloads`: pushes, tags, releases per provider), and both in one call (`verify`). Pure
functions over headers and bytes; the HTTP server in `service/` answers and queues."""
