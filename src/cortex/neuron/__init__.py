"""The node daemon (``neuron run``): device workers, model registry, generation API.

Modules, one job each: ``workers`` (one OS thread per device), ``models`` (model entries and
their states), ``loader`` (id -> source -> harness -> memory check -> fetch -> load),
``requests`` (OpenAI request bodies -> attrs types with clear 400s), ``textstream``
(incremental detokenisation and stop strings), ``generation`` (the step loop), ``api`` (FastAPI
routes per the neuron HTTP API contract), ``metrics``, ``discovery`` and ``daemon``.
"""
