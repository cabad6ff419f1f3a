"""``python -m orderbook_store`` runs the command line."""

from orderbook_store.cli import main

main()
