"""Command-line programs: ``cortex`` (gateway and operator tools) and ``neuron`` (node daemon)."""
