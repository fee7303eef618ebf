"""Wire formats: OpenAI and Anthropic shapes, translation between them, errors and SSE.

Modules here are pure (no network, no server state) so they can be tested on golden data.
"""
