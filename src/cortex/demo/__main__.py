"""``python -m cortex.demo``."""

from cortex.demo.main import main

main()
