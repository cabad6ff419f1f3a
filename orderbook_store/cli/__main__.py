"""``python -m orderbook_store.cli`` runs the command line, like ``orderbook-store``."""

from orderbook_store.cli import main

main()
