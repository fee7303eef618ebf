"""The gateway (``cortex serve``): one endpoint in front of a fleet of neurons.

``fleet`` keeps the view of every neuron, ``catalogue`` turns it into ``/v1/models``, ``router``
decides where a request goes (pure functions over that view), ``loader`` carries out cold loads,
evictions and idle unloads, ``proxy`` streams answers through, ``metrics`` counts it all, and
``app`` is the FastAPI application that ties them together.
"""
