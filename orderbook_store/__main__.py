"""``python -m orderbook_store`` runs the command line."""

from .cli import main

main()
