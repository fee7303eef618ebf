"""``make demo`` / ``python -m cortex.demo``: a whole cortex fleet on one machine, explained.

A newcomer's first command. It builds demo models (no download), serves them from a local
``cortex registry``, starts two ``neuron run`` daemons and a ``cortex serve`` gateway on loopback,
walks through what cortex does (printing each step), then keeps serving until Ctrl-C.
The modules: :mod:`.models` (demo repos), :mod:`.configs` (the TOML files),
:mod:`.processes` (child processes and their logs), :mod:`.walkthrough` (the steps),
:mod:`.main` (the command line).
"""
