"""The recording gateway: an OpenAI-compatible HTTP front for a serving engine that records
every turn token-exactly (and all feedback) on Kafka, through a durable local spool.

Modules: `app` (HTTP edge), `service` (one turn end to end), `streaming` (SSE), `chat`
(templates, tool-call parsers), `decode` (token stream -> visible text), `sessions`,
`auth`, `spool`, `metrics`, `wire` (request shapes), `server` (assembly and running).
"""
